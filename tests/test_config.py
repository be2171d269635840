"""The Hydra config tree, composed in-process with the compose API (no subprocess, no training).

Every option of every group must compose *and resolve*; recipes flow from `dataset.recipe` into
trainer/optimizer/scheduler; types are checked at compose time; run directories are
deterministic and name the method, the pair and the seed.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

import distill.config  # noqa: F401 - registers the schema, the model groups and the resolvers
from distill.config import ON_DEMAND_MODELS
from distill.models import list_models
from distill.preflight import register_models_named_in

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"

FILE_GROUPS = ("benchmark", "dataset", "distiller", "experiment", "logger", "optimizer", "scheduler")
# teacher/student options come from the model registry; a sample keeps this fast
MODEL_SAMPLE = ("resnet8", "resnet20", "resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13",
                "mobilenetv2", "shufflenetv1", "shufflenetv2", "tv_resnet18")


pytestmark = pytest.mark.fast   # the inner-loop tier (make test-fast): the config tree composes


def file_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def make(*overrides: str, hydra_cfg: bool = False) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # someone else's leftover state
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="test"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_cfg)


def resolved(*overrides: str) -> dict:
    cfg = make(*overrides)
    out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert "${" not in repr(out), "unresolved interpolation left in the config"
    return out


def run_parts(cfg_dict: dict) -> tuple[str, ...]:
    return Path(cfg_dict["run_dir"]).parts


# --- every option composes and resolves -----------------------------------------------------
def test_config_groups_exist():
    for group in FILE_GROUPS:
        assert file_options(group), f"configs/{group}/ has no options"


@pytest.mark.parametrize("group,option", [(g, o) for g in FILE_GROUPS for o in file_options(g)]
                         + [(g, m) for g in ("teacher", "student") for m in MODEL_SAMPLE])
def test_every_option_composes_and_resolves(group, option):
    out = resolved(f"{group}={option}")
    if group in ("dataset", "distiller", "optimizer", "scheduler", "teacher", "student"):
        assert out[group]["name"] == option, "config option name == the component's name"
    # every recipe interpolation lands on a typed value
    assert isinstance(out["trainer"]["epochs"], int) and out["trainer"]["epochs"] >= 1
    assert isinstance(out["trainer"]["batch_size"], int) and out["trainer"]["batch_size"] >= 1
    assert isinstance(out["optimizer"]["lr"], float) and out["optimizer"]["lr"] > 0
    assert all(isinstance(m, int) for m in out["scheduler"]["milestones"])
    assert out["run_dir"]


@pytest.mark.parametrize("dataset", file_options("dataset"))
def test_dataset_recipe_is_consistent(dataset):
    out = resolved(f"dataset={dataset}")
    recipe = out["dataset"]["recipe"]
    assert set(recipe) >= {"epochs", "batch_size", "lr", "weight_decay", "milestones"}
    assert out["trainer"]["epochs"] == recipe["epochs"]
    assert out["trainer"]["batch_size"] == recipe["batch_size"]
    assert out["optimizer"]["lr"] == pytest.approx(recipe["lr"])
    assert out["optimizer"]["weight_decay"] == pytest.approx(recipe["weight_decay"])
    assert out["scheduler"]["milestones"] == recipe["milestones"]
    assert recipe["milestones"] == sorted(recipe["milestones"])
    assert all(0 < m < recipe["epochs"] for m in recipe["milestones"]), \
        "a milestone at or after the last epoch never fires"


def test_logger_list_composes():
    out = resolved("logger=[tensorboard,wandb]")
    assert set(out["logger"]) == {"tensorboard", "wandb"}
    assert resolved("logger=jsonl")["logger"] == {}


def test_every_registered_model_is_a_teacher_and_student_option():
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        models = {m for m in list_models() if not m.startswith(ON_DEMAND_MODELS)}
        assert "tv_resnet18" in models and "resnet20" in models
        assert models <= set(loader.get_group_options("teacher"))
        assert models <= set(loader.get_group_options("student"))
        # timm's are stored when a command names them (each stored option costs every compose)
        register_models_named_in(["teacher=timm_resnet10t", "student=timm_vit_tiny_patch16_224,resnet8"])
        assert {"timm_resnet10t", "timm_vit_tiny_patch16_224"} <= set(
            loader.get_group_options("teacher")) & set(loader.get_group_options("student"))


# --- option files agree with the registries they configure -----------------------------------
@pytest.mark.parametrize("option", file_options("distiller"))
def test_distiller_file_matches_registry(option):
    from _compose import method_options
    from distill.method import DISTILLERS
    from distill.method import FIXED_ARGUMENTS
    from distill.registry import check_options

    assert OmegaConf.load(CONFIG_DIR / "distiller" / f"{option}.yaml").name == option, \
        "file name == config name == registry key"
    assert option in DISTILLERS
    # resolved the way a run without an experiment file resolves it (no per-pair `tuned` values)
    options = method_options(option)
    cls = DISTILLERS.get(option)
    check_options(cls, options, key="distiller", skip=FIXED_ARGUMENTS)
    cls.check_values(options)
    # the file states the class's defaults (the reference recipe) rather than drifting from them
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty and p.default is not None}
    assert {k: options[k] for k in defaults} == defaults


@pytest.mark.parametrize("option", file_options("dataset"))
def test_dataset_file_matches_registry(option):
    """Every key of the dataset file (but name and recipe) is an argument of build_datasets or
    of the registered builder, with the annotated type."""
    import inspect

    from distill.data import DATASETS, build_datasets
    from distill.registry import check_options

    data = resolved(f"dataset={option}")["dataset"]
    assert data["name"] == option
    assert option in DATASETS
    generic = {k for k, p in inspect.signature(build_datasets).parameters.items()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"name"}
    options = {k: v for k, v in data.items() if k not in ("name", "recipe", *generic)}
    check_options(DATASETS.get(option), options, key="dataset")


@pytest.mark.parametrize("option", file_options("logger"))
def test_logger_file_matches_registry(option):
    from distill.registry import check_options
    from distill.tracking import TRACKERS

    backends = resolved(f"logger={option}")["logger"]
    for name, options in backends.items():
        assert name in TRACKERS, f"logger/{option}.yaml names unknown backend {name!r}"
        check_options(TRACKERS.get(name), options or {}, key=f"logger.{name}",
                      skip=("run_dir", "config", "run_name", "resume_state"))


# --- the design card's commands ---------------------------------------------------------------
def test_design_card_kd_overrides():
    out = resolved("distiller=kd", "teacher=resnet56", "student=resnet20")
    assert out["distiller"]["name"] == "kd"
    assert out["distiller"]["temperature"] == pytest.approx(4.0)
    assert out["teacher"]["name"] == "resnet56" and out["student"]["name"] == "resnet20"
    assert out["dataset"]["name"] == "cifar100"  # the default dataset of the card


def test_experiment_demo():
    out = resolved("experiment=demo")
    assert out["dataset"]["name"] == "digits"
    assert out["teacher"]["auto_train"] is True
    # command-line choices still win over the experiment's
    again = resolved("experiment=demo", "distiller=none", "student=resnet20")
    assert again["distiller"]["name"] == "none" and again["student"]["name"] == "resnet20"
    assert again["dataset"]["name"] == "digits"


# --- recipes ----------------------------------------------------------------------------------
def test_cifar100_reference_recipe():
    out = resolved("dataset=cifar100")
    assert out["trainer"]["epochs"] == 240
    assert out["trainer"]["batch_size"] == 64
    assert out["optimizer"]["name"] == "sgd"
    assert out["optimizer"]["lr"] == pytest.approx(0.05)
    assert out["optimizer"]["momentum"] == pytest.approx(0.9)
    assert out["optimizer"]["weight_decay"] == pytest.approx(5e-4)
    assert out["scheduler"]["name"] == "multistep"
    assert out["scheduler"]["milestones"] == [150, 180, 210]
    assert out["scheduler"]["gamma"] == pytest.approx(0.1)


def test_digits_recipe_is_shorter():
    digits, cifar = resolved("dataset=digits"), resolved("dataset=cifar100")
    assert digits["trainer"]["epochs"] < cifar["trainer"]["epochs"]


def test_overrides_win_over_recipe():
    out = resolved("dataset=cifar100", "trainer.epochs=3", "optimizer.lr=0.1",
                   "trainer.batch_size=8")
    assert out["trainer"]["epochs"] == 3
    assert out["trainer"]["batch_size"] == 8
    assert out["optimizer"]["lr"] == pytest.approx(0.1)
    assert out["dataset"]["recipe"]["epochs"] == 240  # the recipe itself is untouched


@pytest.mark.parametrize("override,key", [
    ("optimizer.lr=abc", "optimizer.lr"),
    ("trainer.epochs=1.5", "trainer.epochs"),
    ("trainer.batch_size=big", "trainer.batch_size"),
    ("teacher.auto_train=maybe", "teacher.auto_train"),
    ("seed=zero", "seed"),
])
def test_wrong_type_raises_at_compose(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        make(override)
    text = f"{info.value}\n{info.value.__cause__}"
    assert key in text


def test_unknown_key_raises_at_compose():
    with pytest.raises(ConfigCompositionException) as info:
        make("trainer.epoch=3")
    assert "epoch" in f"{info.value}\n{info.value.__cause__}"


# --- run directory ----------------------------------------------------------------------------
def test_run_dir_kd_names_pair_method_seed():
    out = resolved("dataset=cifar100", "distiller=kd", "teacher=resnet56", "student=resnet20")
    assert run_parts(out)[-4:] == ("cifar100", "resnet56-resnet20", "kd", "seed0")


def test_run_dir_none_names_only_the_student():
    a = resolved("dataset=digits", "distiller=none", "teacher=resnet56", "student=resnet8")
    b = resolved("dataset=digits", "distiller=none", "teacher=resnet110", "student=resnet8")
    assert run_parts(a)[-4:] == ("digits", "resnet8", "none", "seed0")
    assert a["run_dir"] == b["run_dir"], "a vanilla run does not depend on the (unused) teacher"


def test_run_dir_is_deterministic_and_distinct():
    kd = resolved("dataset=fake", "distiller=kd")
    assert kd["run_dir"] == resolved("dataset=fake", "distiller=kd")["run_dir"]
    assert kd["run_dir"] != resolved("dataset=fake", "distiller=none")["run_dir"]
    assert kd["run_dir"] != resolved("dataset=digits", "distiller=kd")["run_dir"]
    seed3 = resolved("dataset=fake", "distiller=kd", "seed=3")
    assert run_parts(seed3)[-1] == "seed3"
    assert run_parts(seed3)[:-1] == run_parts(kd)[:-1]


def test_run_dir_appends_tag():
    plain = resolved("dataset=fake", "distiller=kd")
    tagged = resolved("dataset=fake", "distiller=kd", "tag=abl")
    assert tagged["run_dir"] != plain["run_dir"]
    method = run_parts(tagged)[-2]
    assert method.startswith("kd") and method.endswith("abl")
    assert run_parts(tagged)[-3] == "resnet56-resnet20" and run_parts(tagged)[-1] == "seed0"


def test_hydra_run_dir_is_the_run_dir():
    cfg = make("dataset=fake", "distiller=kd", "tag=x", hydra_cfg=True)
    assert OmegaConf.select(cfg, "hydra.run.dir") == cfg.run_dir
    assert cfg.hydra.job.chdir is False


# --- the CIFAR-100 benchmark pairs --------------------------------------------------------------
# (teacher, student, DKD beta, lr) of the reference configs (mdistiller configs/cifar100/dkd/)
CIFAR100_PAIRS = {
    "res56_res20": ("resnet56", "resnet20", 2.0, 0.05),
    "res110_res32": ("resnet110", "resnet32", 2.0, 0.05),
    "res32x4_res8x4": ("resnet32x4", "resnet8x4", 8.0, 0.05),
    "wrn40_2_wrn16_2": ("wrn_40_2", "wrn_16_2", 6.0, 0.05),
    "wrn40_2_wrn40_1": ("wrn_40_2", "wrn_40_1", 6.0, 0.05),
    "vgg13_vgg8": ("vgg13", "vgg8", 6.0, 0.05),
    "res32x4_shufflev1": ("resnet32x4", "shufflenetv1", 8.0, 0.01),
    "wrn40_2_shufflev1": ("wrn_40_2", "shufflenetv1", 8.0, 0.01),
    "vgg13_mobilenetv2": ("vgg13", "mobilenetv2", 6.0, 0.01),
    "res50_mobilenetv2": ("resnet50", "mobilenetv2", 8.0, 0.01),
    "res32x4_shufflev2": ("resnet32x4", "shufflenetv2", 8.0, 0.01),
}


def test_every_cifar100_pair_has_an_experiment_file():
    assert set(p.stem for p in (CONFIG_DIR / "experiment" / "cifar100").glob("*.yaml")) == set(CIFAR100_PAIRS)


@pytest.mark.parametrize("pair", sorted(CIFAR100_PAIRS))
def test_cifar100_pair_is_the_reference_run(pair):
    teacher, student, beta, lr = CIFAR100_PAIRS[pair]
    out = resolved(f"experiment=cifar100/{pair}", "distiller=dkd")
    assert (out["teacher"]["name"], out["student"]["name"]) == (teacher, student)
    assert out["dataset"]["name"] == "cifar100" and out["trainer"]["epochs"] == 240
    assert out["trainer"]["batch_size"] == 64 and out["scheduler"]["milestones"] == [150, 180, 210]
    assert out["optimizer"]["lr"] == pytest.approx(lr)
    assert out["distiller"]["beta"] == pytest.approx(beta)
    assert out["distiller"]["warmup_epochs"] == 20 and out["distiller"]["alpha"] == 1.0
    # the same pair with another method: the tuned DKD value stays out of its options
    kd = resolved(f"experiment=cifar100/{pair}", "distiller=kd")
    assert "beta" not in kd["distiller"] and kd["optimizer"]["lr"] == pytest.approx(lr)


def test_command_line_beats_the_experiment_and_dkd_defaults_without_one():
    assert resolved("experiment=cifar100/res56_res20", "distiller=dkd",
                    "distiller.beta=3")["distiller"]["beta"] == 3
    assert resolved("distiller=dkd")["distiller"]["beta"] == 8.0


# --- benchmark sweeps (benchmark=<name>, used with -m) ---------------------------------------
def sweep_params(benchmark: str) -> dict[str, list[str]]:
    params = make(f"benchmark={benchmark}", hydra_cfg=True).hydra.sweeper.params
    return {k: [v.strip() for v in str(params[k]).split(",")] for k in params}


def test_every_registered_method_has_its_file():
    from distill.method import DISTILLERS

    assert set(file_options("distiller")) == set(DISTILLERS.list())


def test_cifar100_benchmark_sweeps_every_reference_pair_and_method():
    from distill.method import DISTILLERS

    params = sweep_params("cifar100")
    assert sorted(params["experiment"]) == sorted(f"cifar100/{p}" for p in CIFAR100_PAIRS)
    assert params["distiller"] == DISTILLERS.list()
    assert params["seed"] == ["0", "1", "2"]
    for experiment in params["experiment"]:   # every point of the grid composes and resolves
        assert resolved(f"experiment={experiment}", "benchmark=cifar100",
                        "distiller=dkd")["dataset"]["name"] == "cifar100"


@pytest.mark.slow   # a sweep of the CIFAR-100 grid's vanilla runs: about 15 s
def test_cifar100_benchmark_trains_each_vanilla_student_once_per_seed():
    """Jobs of a method without a teacher share one sweep folder per student and seed (two
    pairs have mobilenetv2 students, two shufflenetv1): the job that comes second must find the
    first's run, with nothing that resuming would call a different experiment."""
    from distill.engine.rundir import RESUMABLE_CHANGES, config_differences

    experiments = sweep_params("cifar100")["experiment"]
    for method in ("none", "dml"):
        folders: dict[str, list[dict]] = {}
        for experiment in experiments:
            overrides = (f"experiment={experiment}", "benchmark=cifar100", f"distiller={method}")
            subdir = make(*overrides, hydra_cfg=True).hydra.sweep.subdir
            folders.setdefault(subdir, []).append(resolved(*overrides))
        students = {cfgs[0]["student"]["name"] for cfgs in folders.values()}
        assert len(folders) == len(students) == 9 < len(experiments), sorted(folders)
        for subdir, configs in folders.items():
            assert subdir == f"{configs[0]['student']['name']}/{method}/seed0"
            for other in configs[1:]:
                assert config_differences(configs[0], other,
                                          allowed=RESUMABLE_CHANGES + ("teacher",)) == []


def test_digits_benchmark_runs_every_registered_method():
    from distill.method import DISTILLERS

    params = sweep_params("digits")
    assert params["experiment"] == ["demo"] and params["seed"] == ["0", "1", "2"]
    assert sorted(params["distiller"]) == sorted(DISTILLERS.list())
    # TAKD's chain must not start at the teacher itself (resnet32 in the demo)
    takd = resolved("experiment=demo", "benchmark=digits", "distiller=takd")
    assert takd["distiller"]["assistants"] == ["resnet14"]
    assert resolved("distiller=takd")["distiller"]["assistants"] == ["resnet32"]
    assert "assistants" not in resolved("benchmark=digits", "distiller=kd")["distiller"]


def test_dml_experiment_is_the_papers_cifar100_setting():
    out = resolved("experiment=dml_cifar100")
    assert out["distiller"]["name"] == "dml" and out["distiller"]["peers"] == ["resnet32"] * 2
    assert (out["trainer"]["epochs"], out["trainer"]["batch_size"]) == (200, 64)
    assert out["optimizer"]["lr"] == pytest.approx(0.1) and out["optimizer"]["nesterov"] is True
    assert out["optimizer"]["momentum"] == pytest.approx(0.9)
    assert out["scheduler"]["milestones"] == [60, 120, 180]
    baseline = resolved("experiment=dml_cifar100", "distiller=none")
    assert baseline["student"]["name"] == "resnet32" and baseline["trainer"]["epochs"] == 200
