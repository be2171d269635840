"""The search loop of `ContinuingOptunaSweeper`: Hydra's Optuna sweep, changed in three ways so
that the same command again continues a stored study instead of replaying it.

1. **A fresh seed per command.** A seeded sampler built anew by every command draws the same
   random start-up points again; their trial folders (named by the parameters) hold finished
   runs, which were read back and recorded as new COMPLETE trials, so a continued search trained
   nothing and TPE counted those points twice. The sampler is seeded from (seed, trials so far):
   the same command sequence gives the same search, and every command draws new points.
2. **No replays.** A suggestion equal to a finished trial's parameters (a discrete space can
   give one) is recorded as FAIL with the user attribute `replay_of` and not launched; it does
   not spend the budget. After `MAX_REPLAYS` in a row the space is taken as exhausted.
3. **Stopped trials go on as the same trial.** A trial whose run stopped on a signal (exit 75
   or 130: the run resumes from its checkpoint) stays RUNNING, and the next command first runs
   it again in the same folder, so the run resumes where it stopped, and tells the result to
   that trial. A trial whose run exits otherwise is marked FAIL. One command works on a study
   at a time: a RUNNING trial found at the start belongs to a command that has stopped.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, List, Sequence

import numpy as np
import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import (OptunaSweeperImpl,
                                                      create_params_from_overrides)
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)

MAX_REPLAYS = 100   # suggestions in a row that equal finished trials: the space is used up
RESUMABLE_EXITS = (75, 130)   # distill.engine.preemption: EXIT_PREEMPTED, EXIT_INTERRUPTED


def command_seed(seed: int, trials_so_far: int) -> int:
    """The sampler's seed for a command that starts with `trials_so_far` trials stored."""
    return int(np.random.SeedSequence([seed, trials_so_far]).generate_state(1)[0])


def overrides_of(params: dict[str, Any], fixed: dict[str, Any]) -> tuple[str, ...]:
    """A trial's command-line overrides, as Hydra's Optuna sweeper writes them."""
    return tuple(f"{name}={value}" for name, value in {**params, **fixed}.items())


class ContinuingSweep(OptunaSweeperImpl):

    def sweep(self, arguments: List[str]) -> None:
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config() + list(arguments)
        space, fixed = create_params_from_overrides(params_conf)
        for name in fixed:
            space.pop(name, None)
        directions = self._get_directions()
        study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                    directions=directions, load_if_exists=True)
        study.sampler = self._sampler_for(space, len(study.trials))
        log.info(f"Study {study.study_name} in {self.storage}: {len(study.trials)} trials so far, "
                 f"{self.n_trials} more to run (sampler {type(study.sampler).__name__})")

        stopped = [t for t in study.trials if t.state == TrialState.RUNNING]
        for trial in stopped:
            log.info(f"Trial {trial.number} stopped before it finished: running it again "
                     "(its run resumes from its checkpoint)")
        self._launch(study, [(t.number, overrides_of(t.params, fixed)) for t in stopped])

        to_go, replays = self.n_trials, 0
        while to_go > 0 and replays < MAX_REPLAYS:
            batch = []
            for trial in (study.ask() for _ in range(min(to_go, self.n_jobs))):
                self._configure_trials([trial], space, fixed)
                replayed = finished_with(study, trial.params)
                if replayed is None:
                    batch.append((trial.number, overrides_of(trial.params, fixed)))
                    continue
                replays += 1
                trial.set_user_attr("replay_of", replayed.number)
                study.tell(trial, state=TrialState.FAIL)
                log.info(f"Suggestion {trial.params} equals trial {replayed.number}: "
                         "not run again (recorded as FAIL, replay_of)")
            if batch:
                replays = 0
                self._launch(study, batch)
                to_go -= len(batch)
        if replays >= MAX_REPLAYS:
            log.warning(f"{MAX_REPLAYS} suggestions in a row equal finished trials: the search "
                        f"space looks used up; {to_go} of {self.n_trials} trials not run")
        self._write_results(study, directions)

    def _sampler_for(self, space: dict, trials_so_far: int) -> Any:
        """The configured sampler, built for this command: a seeded one gets a seed drawn
        from its configured seed and the study's trial count so far."""
        config = OmegaConf.to_container(self.sampler) if isinstance(self.sampler, DictConfig) \
            else self.sampler
        if not isinstance(config, dict):
            return config   # a sampler object built elsewhere: used as it is
        if config.get("seed") is not None:
            config["seed"] = command_seed(config["seed"], trials_so_far)
        sampler = instantiate(config)
        if isinstance(sampler, functools.partial):   # the grid sampler takes the space
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            sampler = sampler(grid)
        return sampler

    def _launch(self, study: optuna.Study, batch: Sequence[tuple[int, tuple[str, ...]]]) -> None:
        """Runs `batch` ((trial number, overrides) pairs) and tells the study each result."""
        if not batch:
            return
        try:
            returns = self.launcher.launch([o for _, o in batch], initial_job_idx=self.job_idx)
        except SystemExit as stop:
            # The basic launcher runs the job in this process: a run's sys.exit ends the sweep.
            if stop.code not in RESUMABLE_EXITS:
                for number, _ in batch:
                    study.tell(number, state=TrialState.FAIL)
            raise
        self.job_idx += len(returns)
        failures = 0
        for (number, _), ret in zip(batch, returns):
            try:
                value = ret.return_value
                values = [float(v) for v in value] if isinstance(value, (list, tuple)) \
                    else [float(value)]
                study.tell(number, values=values)
            except Exception as exc:   # the trial's own error: the search goes on
                failures += 1
                study.tell(number, state=TrialState.FAIL)
                log.warning(f"Trial {number} failed: {exc}")
        if failures / len(returns) > self.max_failure_rate:
            for ret in returns:
                ret.return_value   # raises the first failure, with its traceback

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        if not any(t.state == TrialState.COMPLETE for t in study.trials):
            return
        if len(directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}; best value: {best.value}")
        else:
            results = {"name": "optuna", "solutions": [
                {"params": t.params, "values": t.values} for t in study.best_trials]}
        OmegaConf.save(OmegaConf.create(results),
                       f"{self.config.hydra.sweep.dir}/optimization_results.yaml")


def finished_with(study: optuna.Study, params: dict[str, Any]) -> FrozenTrial | None:
    """The finished (COMPLETE) trial whose parameters equal `params`, if there is one."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.params == params:
            return trial
    return None

