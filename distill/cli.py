"""The command line: `tools/train.py` and the `distill-train` console script.

    python tools/train.py distiller=dkd teacher=resnet56 student=resnet20
    distill-train -m distiller=none,kd seed=0,1,2 dataset=digits

Bad input ends in one short screen naming the key and what is allowed, exit code 2, no
traceback; a non-finite loss exits 3; a run stopped by SIGTERM/SIGUSR1 exits 75, by Ctrl-C 130
(either resumes when run again).
"""
from __future__ import annotations

import logging
import sys

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distill import distributed as dist_utils
from distill.app import run
from distill.config import CONFIG_DIR
from distill.engine.preemption import EXIT_INTERRUPTED, Preempted, exit_on_stop
from distill.engine.rundir import note_new_folders
from distill.errors import ConfigError
from distill.preflight import check_overrides
from distill.validation import resolve_device


def print_error(exc: BaseException) -> None:
    from rich.console import Console
    from rich.markup import escape

    text = exc.render() if isinstance(exc, ConfigError) else str(exc)
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(text)}", markup=True)


def _hydra_task(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    try:
        run_dir = hydra_cfg.runtime.output_dir   # the job's real directory (also under -m)
        dist_utils.adopt_slurm_tasks()           # hydra/launcher=slurm with several GPUs
        if dist_utils.launched_by_torchrun():
            dist_utils.init_from_env(use_cuda=resolve_device(cfg.device).type == "cuda")
            # one directory per job: a sweep's time stamp may differ between ranks by a second
            run_dir = dist_utils.broadcast_object(run_dir)
            if not dist_utils.is_main_process():
                logging.getLogger("distill").setLevel(logging.WARNING)
        OmegaConf.set_struct(cfg, False)
        cfg.run_dir = run_dir
        OmegaConf.set_struct(cfg, True)
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except ConfigError as exc:
        print_error(exc)
        sys.exit(2)
    except FloatingPointError as exc:   # a non-finite loss (trainer.on_nonfinite=stop)
        print_error(exc)
        sys.exit(3)
    except Preempted as exc:   # the trainer logged the step and how to resume; a sweep stops too
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:   # Ctrl-C before training started, or pressed three times
        print_error(RuntimeError("interrupted; re-running the command resumes from the last "
                                 "checkpoint, if one was written"))
        sys.exit(EXIT_INTERRUPTED)
    return summary["best_top1"]


class NoteNewFolders(Callback):
    """A Hydra callback (configs/train.yaml, hydra.callbacks): notes which folders of the run
    (or sweep) directory Hydra is about to create, so a command refused before its first step
    removes them again and nothing that was there before (distill.engine.rundir)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        note_new_folders(str(OmegaConf.select(config, "hydra.run.dir")))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        note_new_folders(str(OmegaConf.select(config, "hydra.sweep.dir")))


def main() -> None:
    """Entry point of tools/train.py and the `distill-train` console script."""
    import hydra

    try:
        check_overrides(sys.argv[1:], CONFIG_DIR)
    except ConfigError as exc:
        print_error(exc)
        sys.exit(2)
    exit_on_stop()   # this process ends when a run stops on a signal (late signals ignored)
    try:
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR),
                   config_name="train")(_hydra_task)()
    finally:
        exit_on_stop(False)   # main() called in-process (tests) leaves the process as it was
