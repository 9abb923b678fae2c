"""Checkpoints that are written atomically, load without running code and resume exactly.

- :class:`SafeCheckpointIO`: Lightning's checkpoint IO through :func:`gkl.io.atomic_torch_save`
  (a temporary file beside the target, whatever ``$TMPDIR`` says) and ``torch.load`` with
  ``weights_only=True`` always, also under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.
- :class:`StepCheckpoint`: the mid-epoch ``last-step.ckpt``; a save that falls on an epoch's last
  batch waits for the epoch's end (after validation and the tasks' epoch-end hooks), because
  Lightning resumes a checkpoint taken at the last batch by skipping that epoch's validation and
  ``on_train_epoch_end`` (the class prior's ``end_epoch`` was lost that way).
- :class:`ResumeStateCallback`: stores the run's config in every checkpoint (compared on resume,
  :func:`config_changes`) and, under DDP, the class priors' sums of *all* processes (zeroed on
  processes > 0 after a restore), so a mid-epoch resume gives the same prior as no interruption.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from gkl.io import atomic_torch_save
from gkl.losses import class_priors

CONFIG_KEY = "gkl_config"
ALLOW_CHANGES_KEY = "resume_allow_changes"
# Config keys a resumed run may change: run length, hardware, logging, where files go.
RESUMABLE_CHANGES = (
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.default_root_dir",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "data.num_workers",
    "data.pin_memory",
    "data.download",
    "data.data_dir",
    "teacher.checkpoint",
    "logger",
    "callbacks",
    "paths",
    "hydra",
    "ckpt_path",
    "test",
    "export_weights",
    "optimized_metric",
    "matmul_precision",
    ALLOW_CHANGES_KEY,
)


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu", what: str = "ckpt_path", mmap: bool = False
) -> dict:
    """``torch.load(path, weights_only=True)`` with errors that name the file and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}={path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{what}={path} holds objects that torch.load(weights_only=True) refuses (a file "
            "that could run code, or one not written by gkl/Lightning); gkl never loads such "
            f"files. Use a checkpoint written by gkl. ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"{what}={path} is not a readable checkpoint (truncated or corrupt: {error}); "
            "resume from another checkpoint of the run, e.g. checkpoints/last.ckpt"
        ) from None


def check_lightning_checkpoint(checkpoint: Any, path: str | Path) -> None:
    """Refuse a file that is not a Lightning checkpoint (a bare state_dict, an exported
    ``{"model": state_dict}``) as ``ckpt_path``, saying what it is and where it goes instead."""
    if isinstance(checkpoint, Mapping) and "pytorch-lightning_version" in checkpoint:
        return
    use = (
        "ckpt_path resumes a gkl run from its Lightning checkpoint "
        "(<run dir>/checkpoints/last.ckpt). To distil from these weights set "
        "teacher.checkpoint=<file>; to evaluate them, eval.py ckpt_path=<file>"
    )
    if isinstance(checkpoint, Mapping) and checkpoint:
        if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            raise ValueError(
                f"ckpt_path={path} holds a bare state_dict ({len(checkpoint)} tensors), not a "
                f"Lightning checkpoint: it has no optimizer, epoch or config to resume. {use}"
            )
        if isinstance(checkpoint.get("model"), Mapping):
            raise ValueError(
                f"ckpt_path={path} holds {{'model': state_dict}} (exported weights, mdistiller's "
                f"format), not a Lightning checkpoint. {use}"
            )
    keys = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise ValueError(
        f"ckpt_path={path} is not a Lightning checkpoint (no 'pytorch-lightning_version'; it "
        f"holds {keys}). {use}"
    )


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic saves beside the target; loads that cannot run code (``weights_only=True``)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO.save_checkpoint takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable | Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        # weights_only is always True: an explicit True also beats
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in torch.load.
        return load_checkpoint(path, map_location=map_location)


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(every_n_train_steps=N)`` whose saves on an epoch's last batch are taken
    at the epoch's end instead (after validation and every ``on_train_epoch_end``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._save_at_epoch_end = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        if due and trainer.fit_loop.epoch_loop._num_ready_batches_reached():
            self._save_at_epoch_end = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._save_at_epoch_end:
            self._save_at_epoch_end = False
            if not self._should_skip_saving_checkpoint(trainer):
                self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))


class ResumeStateCallback(pl.Callback):
    """Puts ``config`` (plain containers) into every checkpoint under ``"gkl_config"`` and, under
    DDP, the all-reduced class-prior sums; after a restore, processes > 0 zero their sums (the
    checkpoint's already hold every process's partial sums)."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = dict(config) if config is not None else None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
        if not (dist.is_available() and dist.is_initialized()):
            return
        state = checkpoint["state_dict"]
        for name, prior in class_priors(pl_module):  # every process saves: same collectives
            total = prior.sums.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            key = f"{name}.sums"
            if key in state:
                state[key] = total.to(state[key].device)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path is not None and trainer.global_rank > 0:
            for _, prior in class_priors(pl_module):
                prior.sums.zero_()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` for nested dicts (lists are leaves)."""
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): tree}


def _allowed(key: str, allowed: Iterable[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allowed)


def config_changes(
    saved: Mapping[str, Any], new: Mapping[str, Any], allowed: Iterable[str] = RESUMABLE_CHANGES
) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, new value)`` for every leaf that differs outside ``allowed``."""
    old_flat, new_flat = flatten(saved), flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(old_flat) | set(new_flat)):
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if _equal(before, after) or _allowed(key, allowed):
            continue
        absent = "<absent>"
        changes.append(
            (key, absent if before is missing else before, absent if after is missing else after)
        )
    return changes


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_resume_config(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any], ckpt_path: str | Path
) -> list[tuple[str, Any, Any]]:
    """Raise when ``config`` differs from the checkpoint's outside :data:`RESUMABLE_CHANGES`
    (unless ``resume_allow_changes=true``); returns the accepted changes."""
    saved = checkpoint.get(CONFIG_KEY)
    if saved is None:
        return []
    changes = config_changes(saved, config)
    if changes and not config.get(ALLOW_CHANGES_KEY, False):
        listed = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)
        hint = ""
        if any(key.startswith("optim.") for key, _, _ in changes):
            hint = " (a different optimizer cannot take over the checkpoint's optimizer state)"
        raise ValueError(
            f"ckpt_path={ckpt_path}: the config differs from the one the checkpoint was trained "
            f"with, so the resumed run would not continue that run{hint}:\n{listed}\n"
            f"Drop those overrides to resume exactly, or add ++{ALLOW_CHANGES_KEY}=true to "
            "accept the changes."
        )
    return changes
