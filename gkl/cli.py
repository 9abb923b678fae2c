"""``train.py``'s command line: the composed config is checked before the heavy imports.

Hydra composes the config; :func:`check_inputs` and :func:`check_search_metric` refuse bad values
(``trainer.max_epochs=abc``, a search that would select on the test set) within a second or two,
before Lightning and torch are imported (:mod:`gkl.train`, several seconds under load).
This module imports only the standard library, Hydra/OmegaConf and :mod:`gkl.config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from gkl.checks import check_count, check_non_negative_number, check_number
from gkl.config import CONFIG_DIR

# Hydra's grid sweeper: it launches runs but selects nothing from their return values.
GRID_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything enforces


def check_inputs(cfg: DictConfig) -> None:
    """Fail before anything is built on inputs that would fail (or mislead) later."""
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: the seed must be an integer, e.g. seed=0")
    check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
    for key in ("max_epochs", "max_steps"):
        value = cfg.trainer.get(key)
        if value is not None and (not isinstance(value, int) or value < -1):
            raise ValueError(f"trainer.{key}={value!r} must be an integer >= 0 (-1: no limit)")
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch", "log_every_n_steps"):
        if cfg.trainer.get(key) is not None:
            check_count(f"trainer.{key}", cfg.trainer.get(key))
    if cfg.trainer.get("gradient_clip_val") is not None:
        check_non_negative_number("trainer.gradient_clip_val", cfg.trainer.gradient_clip_val)
    if cfg.get("export_weights"):
        check_writable(Path(cfg.export_weights), "export_weights")


def check_writable(path: Path, what: str) -> None:
    """Raise unless ``path`` can be written (its nearest existing parent is a writable dir)."""
    path = path.expanduser()
    if path.is_dir():
        raise ValueError(f"{what}={path} is a directory: give a file name, e.g. {path}/model.pth")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what}={path}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what}={path}: {parent} is not writable; choose a writable path")


def check_search_metric(cfg: DictConfig, sweeper_target: str | None) -> None:
    """Refuse a hyper-parameter search (any sweeper but Hydra's grid) whose ``optimized_metric``
    is computed on the test set: a ``test/`` metric, or a ``val/`` one when ``data.val_size`` is 0
    (validation then runs on the test set)."""
    metric = cfg.get("optimized_metric")
    if not metric or not sweeper_target or sweeper_target == GRID_SWEEPER:
        return
    if str(metric).startswith("test/"):
        why = f"optimized_metric={metric} is a test-set metric"
    elif str(metric).startswith("val/") and data_val_is_test(cfg):
        why = (
            f"optimized_metric={metric} is computed on the test set here: data.val_size=0 "
            "validates on the test set"
        )
    else:
        return
    raise ValueError(
        f"hyper-parameter search refused: {why}, so the search would select hyper-parameters on "
        "test accuracy. Carve a validation split out of the training set with "
        "data.val_size=5000 (and optimise a val/ metric)."
    )


def check_early_stopping(cfg: DictConfig) -> None:
    """Refuse early stopping on a ``val/`` metric when ``data.val_size`` is 0 (the test set)."""
    for name, callback in (cfg.get("callbacks") or {}).items():
        target = str((callback or {}).get("_target_", ""))
        monitor = str((callback or {}).get("monitor", ""))
        if target.endswith("EarlyStopping") and (
            data_val_is_test(cfg) or monitor.startswith("test/")
        ):
            raise ValueError(
                f"callbacks.{name} stops on {monitor}, which is computed on the test set here "
                "(data.val_size=0 validates on the test set): the epoch count would be chosen on "
                "test accuracy. Carve a validation split with data.val_size=5000, or drop the "
                f"callback (~callbacks.{name})."
            )


def data_val_is_test(cfg: DictConfig) -> bool:
    """``data.val_size == 0``: validation runs on the test set."""
    return (cfg.get("data") or {}).get("val_size") == 0


def sweeper_target() -> str | None:
    """The ``_target_`` of the running Hydra sweeper in a multirun, else ``None``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return hydra_cfg.sweeper.get("_target_")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> Any:
    """Check the config, then import Lightning and train (:func:`gkl.train.train`)."""
    check_inputs(cfg)
    check_search_metric(cfg, sweeper_target())
    check_early_stopping(cfg)
    from gkl.train import train  # Lightning, torch: seconds of imports

    return train(cfg)
