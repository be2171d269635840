"""One declaration per option (distill/config.py): validation, the teacher runs, resume and the
option reference read it; per-pair `tuned` values are checked against the methods' options;
what the engine implements per choice covers exactly the declared choices."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from _compose import REPO, make_cfg
from distill.config import choices_of, declared, teacher_run_defaults
from distill.engine import optim
from distill.engine.rundir import RESUMABLE_CHANGES
from distill.engine.teacher_cache import STORAGE_DTYPES
from distill.engine.trainer import PRECISIONS
from distill.errors import ConfigError
from distill.teachers import teacher_run_config, teacher_training_command
from distill.validation import validate


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): option declarations


def test_a_misspelt_tuned_option_is_refused_with_its_close_match(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate(make_cfg(tmp_path, "+tuned.kd.temprature=9"))
    assert exc.value.key == "tuned.kd.temprature"
    assert "temperature" in exc.value.render()


def test_a_tuned_entry_of_an_unknown_method_is_refused(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate(make_cfg(tmp_path, "+tuned.dkdd.beta=2"))
    assert exc.value.key == "tuned.dkdd" and "dkd" in exc.value.render()


def test_tuned_values_of_the_experiments_are_all_options(tmp_path):
    """Every experiment file's and benchmark's per-pair values name real options."""
    experiments = sorted(p for p in (REPO / "configs" / "experiment").rglob("*.yaml")
                         if "tuned:" in p.read_text())
    assert len(experiments) >= 10
    for path in experiments:
        name = path.relative_to(REPO / "configs" / "experiment").with_suffix("").as_posix()
        validate(make_cfg(tmp_path, f"experiment={name}", "dataset=fake"))
    validate(make_cfg(tmp_path, "benchmark=digits", "dataset=fake"))


def test_declared_choices_are_what_the_engine_implements():
    assert tuple(PRECISIONS) == choices_of("trainer.precision")
    assert tuple(STORAGE_DTYPES) == choices_of("teacher.cache_dtype")
    assert optim.OPTIMIZERS == choices_of("optimizer.name")
    assert optim.SCHEDULES == choices_of("scheduler.name")


@pytest.mark.parametrize("key,value", [("trainer.log_every", 0), ("optimizer.momentum", 1.0),
                                       ("trainer.precision", "fp8"), ("scale", "tiny")])
def test_a_declared_option_refuses_by_its_declaration(key, value, tmp_path):
    cfg = make_cfg(tmp_path)
    OmegaConf.update(cfg, key, value, merge=False)
    with pytest.raises(ConfigError) as exc:
        validate(cfg)
    assert exc.value.key == key and exc.value.allowed == declared()[key][0].allowed_text()


def test_a_zoo_teacher_run_takes_the_declared_defaults(tmp_path):
    """The student's recipe options (declared `for_teachers=False`) never reach the run that
    trains a missing teacher, on its config or on the command it prints."""
    cfg = make_cfg(tmp_path, "trainer.max_steps=3", "trainer.label_smoothing=0.1",
                   "trainer.accumulate=2", "trainer.epochs=7", "trainer.num_workers=1")
    run = teacher_run_config(cfg, "resnet56", False, split={})
    reset = teacher_run_defaults()
    assert {"trainer.max_steps", "trainer.label_smoothing", "trainer.accumulate",
            "trainer.epochs", "trainer.batch_size", "trainer.quantize"} <= set(reset)
    for key, default in reset.items():
        assert OmegaConf.select(run, key, throw_on_resolution_failure=False) == default \
            or OmegaConf.to_container(run)["trainer"][key.split(".")[1]] == default, key
    assert run.trainer.num_workers == 1   # a setting, not the recipe: it carries over
    command = teacher_training_command(cfg, ["trainer.max_steps=3", "trainer.num_workers=1",
                                             "trainer.label_smoothing=0.1"])
    assert "trainer.num_workers=1" in command and "max_steps" not in command
    assert "label_smoothing" not in command


def test_resumable_settings_come_from_the_declarations():
    declared_resumable = {k for k, (o, _) in declared().items() if o.resumable}
    assert declared_resumable <= set(RESUMABLE_CHANGES)
    assert "trainer.max_steps" in RESUMABLE_CHANGES and "trainer.batch_size" not in \
        RESUMABLE_CHANGES
