"""Configs read from files never choose code: gkl's registry of builders a stored config may name.

A run's ``config.yaml``, a checkpoint's ``hyper_parameters`` / ``gkl_config`` and an eval
``results.json`` come from files anyone can craft (a checkpoint from a colleague or a model zoo).
Hydra's ``instantiate`` calls whatever ``_target_`` such a config names (``torch.load`` on a
pickle, ``numpy.load`` with ``allow_pickle``, ``subprocess.Popen``, ...), so before anything from
a stored config is instantiated, :func:`check_stored_config` walks the *whole* config and refuses
any ``_target_`` outside :data:`ALLOWED_TARGETS` (the builders gkl's own ``conf/`` names), any
``_target_`` that is not a plain string (an interpolation could resolve to anything), and the
resolvers that build config nodes from strings (``oc.create``, ``oc.decode``). The error names the
file, the key path and the target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

# Every _target_ in conf/ and in gkl's scripts' overrides (tests/test_security.py checks that this
# is exactly that set; a new _target_ in conf/ must be added here). They build gkl's data modules,
# models, losses, tasks and callbacks, or Lightning / torch.optim / Optuna objects from plain
# arguments; none reads or runs a file named in the config.
ALLOWED_TARGETS = frozenset(
    {
        "gkl.data.CIFARDataModule",
        "gkl.data.FashionMNISTDataModule",
        "gkl.data.ImageNetDataModule",
        "gkl.data.ImageNetLTDataModule",
        "gkl.data.augment.TwoViewCIFARDataModule",
        "gkl.distillers.AT",
        "gkl.distillers.CRD",
        "gkl.distillers.FitNet",
        "gkl.distillers.KDSVD",
        "gkl.distillers.LossSum",
        "gkl.distillers.NST",
        "gkl.distillers.OFD",
        "gkl.distillers.PKT",
        "gkl.distillers.RKD",
        "gkl.distillers.ReviewKD",
        "gkl.distillers.SP",
        "gkl.distillers.VID",
        "gkl.loggers.CSVLogger",
        "gkl.losses.CrossEntropyLoss",
        "gkl.losses.DKDLoss",
        "gkl.losses.DKLLoss",
        "gkl.losses.GKLLoss",
        "gkl.losses.KDLoss",
        "gkl.losses.TradesKLLoss",
        "gkl.models.build.build_classifier",
        "gkl.models.build.build_teacher",
        "gkl.models.clip.build_clip_student",
        "gkl.models.clip.build_clip_teacher",
        "gkl.run_dir.WritableRunDirectory",
        "gkl.tasks.AdversarialTask",
        "gkl.tasks.ClassificationTask",
        "gkl.tasks.DistillationTask",
        "gkl.tasks.RNGStateCallback",
        "gkl.tasks.best_epoch.BestTestEpochRecorder",
        "gkl.tasks.checkpointing.StepCheckpoint",
        "gkl.tasks.optim.epoch_scheduler",
        "gkl.tasks.progress.ProgressFile",  # scripts/demo_fmnist.py
        "gkl.tasks.progress.progress_bar",
        "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
        "lightning.pytorch.Trainer",
        "lightning.pytorch.callbacks.EarlyStopping",
        "lightning.pytorch.callbacks.LearningRateMonitor",
        "lightning.pytorch.callbacks.ModelCheckpoint",
        "lightning.pytorch.loggers.MLFlowLogger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "lightning.pytorch.loggers.WandbLogger",
        "lightning.pytorch.profilers.SimpleProfiler",
        "lightning.pytorch.strategies.DDPStrategy",
        "optuna.samplers.TPESampler",
        "torch.optim.Adam",
        "torch.optim.AdamW",
        "torch.optim.SGD",
    }
)
# OmegaConf resolvers that turn a string into config nodes (a _target_ could hide in one).
NODE_BUILDING_RESOLVERS = ("oc.create", "oc.decode")


class StoredConfigError(ValueError):
    """A stored config names code gkl does not build (a crafted or foreign file)."""


def check_stored_config(config: Any, source: str, prefix: str = "") -> None:
    """Raise :class:`StoredConfigError` unless every ``_target_`` in ``config`` (recursively,
    lists included) is a plain string in :data:`ALLOWED_TARGETS`; ``source`` names the file."""
    if isinstance(config, DictConfig | ListConfig):
        config = OmegaConf.to_container(config, resolve=False)
    if isinstance(config, Mapping):
        items = [(f"{prefix}{key}", key, value) for key, value in config.items()]
    elif isinstance(config, list | tuple):
        items = [(f"{prefix}[{i}]", None, value) for i, value in enumerate(config)]
    else:
        items = []
    for path, key, value in items:
        if key == "_target_" and (not isinstance(value, str) or value not in ALLOWED_TARGETS):
            raise StoredConfigError(
                f"{source}: {path}={value!r} is not one of gkl's builders, so it was not run "
                "(a stored config may only name the _target_s of gkl's own conf/; see "
                "gkl.stored_config.ALLOWED_TARGETS). The file was crafted or comes from another "
                "program: do not use it, or give the section on the command line instead"
            )
        if isinstance(value, str) and any(r + ":" in value for r in NODE_BUILDING_RESOLVERS):
            raise StoredConfigError(
                f"{source}: {path}={value!r} builds config nodes from a string "
                f"({'/'.join(NODE_BUILDING_RESOLVERS)}), which a stored config may not do (it "
                "could name any code); gkl never writes that, so the file was crafted"
            )
        if isinstance(value, Mapping | list | tuple | DictConfig | ListConfig):
            separator = "" if isinstance(value, list | tuple | ListConfig) else "."
            check_stored_config(value, source, f"{path}{separator}")
