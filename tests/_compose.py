"""Compose the real Hydra config in-process, the way tools/train.py does."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import distill.catalog  # noqa: F401 - registers the schema, model groups, methods, resolvers
from distill.preflight import register_models_named_in

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "configs"


def make_cfg(tmp_path: Path, *overrides: str, run: str = "run"):
    register_models_named_in(list(overrides))   # timm_* options are stored when named
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"zoo.root={tmp_path / 'zoo'}", "logger=jsonl",
                                          "trainer.progress=false", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = str(tmp_path / run)
    OmegaConf.set_struct(cfg, True)
    return cfg


def method_options(method: str, teacher: str = "resnet14", student: str = "resnet8",
                   *overrides: str) -> dict:
    from distill.validation import method_options as composed

    return composed(method, teacher, student, *overrides)


def write_class_folders(root: Path, *, size: int, per_class: int,
                        classes: tuple[str, ...] = ("a", "b")) -> Path:
    """root/{train,val}/<class>/<i>.png: a tiny class-folder dataset of flat-coloured images."""
    from PIL import Image

    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), (40 * i, 90, 200)).save(
                    root / split / cls / f"{i}.png")
    return root
