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
  processes > 0 after a restore), so a mid-epoch resume gives the same prior as no interruption;
  also the fingerprints of ``data.data_dir`` and ``teacher.checkpoint`` (:func:`run_fingerprints`),
  so a resume that points them elsewhere is refused unless the data / teacher are the same.
- :class:`InterruptCheckpoint`: SIGTERM / SIGINT stop training at the next step boundary (the
  epoch's end on its last batch), write ``checkpoints/interrupted.ckpt`` and exit with status
  128 + signal (143 / 130), so a scheduler sees a preempted run, not a finished one.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import signal
import sys
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from gkl.io import atomic_torch_save
from gkl.losses import class_priors

log = logging.getLogger(__name__)

CONFIG_KEY = "gkl_config"
FINGERPRINTS_KEY = "gkl_fingerprints"
# Resumable changes that are refused unless the content they point at is the same.
FINGERPRINTED = ("data.data_dir", "teacher.checkpoint")
# Data directories up to this size are fingerprinted by content, larger ones by names and sizes.
CONTENT_HASH_LIMIT = 512 * 2**20
INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
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
        self._fingerprints: dict[str, str | None] | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.config is not None:
            checkpoint[CONFIG_KEY] = self.config
            if self._fingerprints is None:  # once per run, at the first save
                self._fingerprints = run_fingerprints(self.config)
            checkpoint[FINGERPRINTS_KEY] = self._fingerprints
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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(data_dir: str | Path | None) -> str | None:
    """SHA-256 over the files under ``data_dir`` (relative names and contents; names and sizes
    only when they exceed :data:`CONTENT_HASH_LIMIT`); None when there is no such directory."""
    if data_dir is None or not Path(data_dir).expanduser().is_dir():
        return None
    root = Path(data_dir).expanduser()
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    sizes = [p.stat().st_size for p in files]
    by_content = sum(sizes) <= CONTENT_HASH_LIMIT
    digest = hashlib.sha256(b"content" if by_content else b"names-and-sizes")
    for path, size in zip(files, sizes, strict=True):
        digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
        if by_content:
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def run_fingerprints(config: Mapping[str, Any]) -> dict[str, str | None]:
    """``{"data.data_dir": data fingerprint, "teacher.checkpoint": teacher file SHA-256}``."""
    flat = flatten(config)
    teacher = flat.get("teacher.checkpoint")
    return {
        "data.data_dir": data_fingerprint(flat.get("data.data_dir")),
        "teacher.checkpoint": (
            file_sha256(teacher) if isinstance(teacher, str) and Path(teacher).is_file() else None
        ),
    }


def check_resume_fingerprints(
    checkpoint: Mapping[str, Any], config: Mapping[str, Any], ckpt_path: str | Path
) -> None:
    """Refuse a resume whose ``data.data_dir`` / ``teacher.checkpoint`` differs from the
    checkpoint's unless the data / teacher file there is the same (same fingerprint)."""
    saved = checkpoint.get(CONFIG_KEY)
    if saved is None or config.get(ALLOW_CHANGES_KEY, False):
        return
    old_flat, new_flat = flatten(saved), flatten(config)
    stored = checkpoint.get(FINGERPRINTS_KEY) or {}
    for key in FINGERPRINTED:
        old, new = old_flat.get(key), new_flat.get(key)
        if old == new:
            continue
        now = run_fingerprints(config)[key]
        if stored.get(key) is not None and now == stored[key]:
            log.info("resuming with %s moved: %r -> %r (same content)", key, old, new)
            continue
        what = "data" if key.startswith("data.") else "teacher checkpoint"
        raise ValueError(
            f"ckpt_path={ckpt_path}: {key} changed from {old!r} to {new!r} and the {what} there "
            f"is not the same as the run's (fingerprint {_short(stored.get(key))} in the "
            f"checkpoint, {_short(now)} now), so the resumed run would continue on other "
            f"{what}. Resume with {key}={old}, or add ++{ALLOW_CHANGES_KEY}=true to accept it."
        )


def _short(digest: str | None) -> str:
    return "none" if digest is None else digest[:12]


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after writing a resumable checkpoint; exit status 128+sig."""


class InterruptCheckpoint(Checkpoint):
    """On SIGTERM / SIGINT: finish the current step, write ``<dirpath>/interrupted.ckpt`` at the
    same points a mid-epoch checkpoint is taken (after a batch; on an epoch's last batch after
    the epoch's end hooks), then raise :class:`TrainingInterrupted` (status 143 / 130). A second
    SIGINT stops at once (``KeyboardInterrupt``)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / INTERRUPTED_CHECKPOINT
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: stopping after this step to write "
            f"{self.path}",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning's own SIGTERM handler (registered when fit starts): ours replaces it,
        # so Lightning never stops at a point a checkpoint cannot resume from exactly.
        if getattr(trainer, "received_sigterm", False):  # caught by Lightning's handler
            self.signum = signal.SIGTERM
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:  # e.g. SIGINT of a background job: stays ignored
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._requested(trainer) and not trainer.fit_loop.epoch_loop._is_training_done:
            self._stop(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._requested(trainer):
            self._stop(trainer)

    def _requested(self, trainer) -> bool:
        """Whether any process received a signal (under DDP all stop at the same step, as
        Lightning's own SIGTERM handling does it: one tiny all-reduce per step)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([self.signum or 0], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.signum is None:
                self.signum = int(flag.item())
        return self.signum is not None

    def _stop(self, trainer) -> None:
        trainer.save_checkpoint(self.path)
        signum, self.signum = self.signum, None
        message = (
            f"training interrupted by {signal.Signals(signum).name} at step "
            f"{trainer.global_step}: wrote {self.path}; resume with ckpt_path={self.path}"
        )
        log.warning(message)
        print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(128 + signum)


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


def _resume_hint(
    saved: Mapping[str, Any], config: Mapping[str, Any], changes: list[tuple[str, Any, Any]]
) -> str:
    """Why the listed changes matter: another optimizer, or a schedule stretched by a longer run."""
    keys = [key for key, _, _ in changes]
    hints = []
    if any(key.startswith("optim.optimizer.") for key in keys):
        hints.append("a different optimizer cannot take over the checkpoint's optimizer state")
    old_epochs = (saved.get("trainer") or {}).get("max_epochs")
    new_epochs = (config.get("trainer") or {}).get("max_epochs")
    if any(key.startswith("optim.scheduler.") for key in keys) and old_epochs != new_epochs:
        hints.append(
            f"trainer.max_epochs {old_epochs} -> {new_epochs} also changes the learning-rate "
            "schedule, which follows the run length: the epochs already trained followed the "
            f"{old_epochs}-epoch schedule, so the result is neither the {old_epochs}- nor a "
            f"{new_epochs}-epoch run; train {new_epochs} epochs from scratch for that, or accept "
            "the stretched schedule"
        )
    return f" ({'; '.join(hints)})" if hints else ""


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
        hint = _resume_hint(saved, config, changes)
        raise ValueError(
            f"ckpt_path={ckpt_path}: the config differs from the one the checkpoint was trained "
            f"with, so the resumed run would not continue that run{hint}:\n{listed}\n"
            f"Drop those overrides to resume exactly, or add ++{ALLOW_CHANGES_KEY}=true to "
            "accept the changes."
        )
    return changes
