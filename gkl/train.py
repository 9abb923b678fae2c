"""Training entry point: compose config -> data, models, loss, task -> Lightning fit/test."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import get_method, instantiate
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from gkl.cli import check_inputs, check_writable, main  # noqa: F401 (the command line)
from gkl.config import CONFIG_DIR  # noqa: F401
from gkl.data.build import build_datamodule
from gkl.io import NO_SPACE, atomic_torch_save, atomic_write_json, atomic_write_text
from gkl.loggers import HistoryTrimCallback, finish_loggers
from gkl.losses import CrossEntropyLoss
from gkl.run_dir import RunLock, check_run_directory, remove_stale_temp_files
from gkl.tasks.checkpointing import (
    InterruptCheckpoint,
    ResumeStateCallback,
    SafeCheckpointIO,
    check_lightning_checkpoint,
    check_resume_config,
    check_resume_fingerprints,
    load_checkpoint,
)
from gkl.tasks.distributed import check_distributed, exclude_rank_local_buffers
from gkl.tasks.progress import keep_library_chatter_in_the_log, print_run_summary
from gkl.tasks.speed import apply_speed

log = logging.getLogger(__name__)

# gkl's data modules save and restore the position in the epoch themselves (ImageDataModule's
# state_dict), so Lightning's "dataloader is not resumable" warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")

SMOKE_METRICS_FILE = "metrics.smoke.json"
METRICS_FILE = "metrics.json"
# Fewer training or test images than this make a run a smoke test (NOT_A_RESULT).
MIN_RESULT_IMAGES = 1000
# torch.compile's cache (speed.compile) goes into the run directory unless the user chose one.
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
INDUCTOR_CACHE_DIR = ".torchinductor"
_USER_INDUCTOR_CACHE = os.environ.get(INDUCTOR_CACHE_ENV)


def has_teacher(cfg: DictConfig) -> bool:
    """``teacher=none`` leaves no ``_target_`` (an experiment may still set teacher fields)."""
    return bool(cfg.get("teacher")) and "_target_" in cfg.teacher


def build_teacher(cfg: DictConfig) -> torch.nn.Module:
    """Instantiate the teacher; on synthetic data a missing checkpoint gives a random teacher."""
    checkpoint = cfg.teacher.get("checkpoint")
    weights_available = (checkpoint and Path(checkpoint).is_file()) or (
        not checkpoint and cfg.teacher.get("pretrained")
    )
    if cfg.data.get("synthetic") and (not weights_available or cfg.teacher.get("pretrained")):
        log.warning("synthetic smoke test: using a randomly initialised teacher")
        return instantiate(cfg.teacher, checkpoint=None, pretrained=False, allow_random=True)
    return instantiate(cfg.teacher)


def check_class_counts(student: torch.nn.Module, teacher: torch.nn.Module | None, dm) -> None:
    """Fail before training when student, teacher and data disagree on the number of classes."""
    x = torch.zeros(2, *dm.input_shape)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        student_classes = student(x).shape[1]
        teacher_classes = teacher(x).shape[1] if teacher is not None else None
    student.train(was_training)
    if student_classes != dm.num_classes:
        raise ValueError(
            f"the student predicts {student_classes} classes but the data set has "
            f"{dm.num_classes}; set model.num_classes=${{data.num_classes}}"
        )
    if teacher_classes is not None and teacher_classes != student_classes:
        raise ValueError(
            f"teacher predicts {teacher_classes} classes, student predicts {student_classes}: "
            "distillation needs the same classes (check teacher.num_classes / the checkpoint)"
        )


def build_task(cfg: DictConfig, model, teacher, loss, num_classes: int) -> pl.LightningModule:
    """Call the task partial with the pieces its constructor accepts; fail on a piece it would drop.

    A configured teacher or a loss other than plain cross-entropy that the task does not take, or a
    ``task.<key>`` its constructor lacks, is an error before training, not silently ignored. A
    ``task.<key>: null`` the constructor lacks is skipped: ``+baseline=ce`` unsets the
    distillation options of a KD experiment that way.
    """
    task_cfg = OmegaConf.create(OmegaConf.to_container(cfg.task, resolve=True))
    factory_params = inspect.signature(get_method(task_cfg._target_)).parameters
    for key in [k for k, v in task_cfg.items() if v is None and k not in factory_params]:
        del task_cfg[key]
    task_factory = instantiate(task_cfg)
    pieces = {
        "model": model,
        "teacher": teacher,
        "loss": loss,
        "num_classes": num_classes,
        "optimizer": instantiate(cfg.optim.optimizer),
        "scheduler": instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
    }
    accepted = inspect.signature(task_factory.func).parameters
    task_name = cfg.task._target_
    unknown = sorted(set(task_factory.keywords) - set(accepted))
    if unknown:
        raise ValueError(
            f"task {task_name} has no option {', '.join(f'task.{k}' for k in unknown)} (set by the "
            f"experiment for another task?); remove it: {' '.join(f'~task.{k}' for k in unknown)}"
        )
    if teacher is not None and "teacher" not in accepted:
        raise ValueError(
            f"a teacher is configured but task {task_name} does not use one; "
            "use task=distill or teacher=none"
        )
    if "teacher" in accepted and teacher is None:
        raise ValueError("task=distill needs a teacher: set teacher=<name> (see conf/teacher/)")
    if loss is not None and "loss" not in accepted and not isinstance(loss, CrossEntropyLoss):
        raise ValueError(
            f"loss {cfg.loss._target_} is configured but task {task_name} trains with plain "
            "cross-entropy and would ignore it; use loss=ce for a CE-only run, or task=distill "
            "teacher=<name> to distil with this loss"
        )
    return task_factory(**{k: v for k, v in pieces.items() if k in accepted})


def smoke_reasons(cfg: DictConfig, datamodule, trainer: pl.Trainer | None = None) -> list[str]:
    """Why a run's metrics are not a result (empty: a real run)."""
    reasons = []
    if getattr(datamodule, "is_synthetic", False):
        reasons.append("synthetic data")
    tc = cfg.trainer
    if tc.get("fast_dev_run"):
        reasons.append("trainer.fast_dev_run")
    if tc.get("max_epochs") == 0 or tc.get("max_steps") == 0:
        reasons.append("trainer.max_epochs=0 or trainer.max_steps=0: untrained network")
    elif trainer is not None and trainer.global_step == 0:
        reasons.append("no training step was taken")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if tc.get(key) not in (None, 1.0):
            reasons.append(f"trainer.{key}={tc.get(key)}")
    if tc.get("overfit_batches"):
        reasons.append(f"trainer.overfit_batches={tc.get('overfit_batches')}")
    for key in ("train_subset", "test_size"):
        value = cfg.data.get(key)
        if value is not None and value < MIN_RESULT_IMAGES:
            reasons.append(f"data.{key}={value} < {MIN_RESULT_IMAGES} images")
    return reasons


def is_smoke_test(cfg: DictConfig, datamodule, trainer: pl.Trainer | None = None) -> bool:
    return bool(smoke_reasons(cfg, datamodule, trainer))


def is_synthetic_or_dev_run(cfg: DictConfig, datamodule) -> bool:
    return bool(getattr(datamodule, "is_synthetic", False) or cfg.trainer.get("fast_dev_run"))


def write_metrics(
    cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float], smoke: bool | list[str]
) -> Path:
    """Write last-epoch metrics; smoke tests go to a file that cannot pass for a result."""
    out_dir = Path(cfg.paths.output_dir)
    record = {
        "metrics": metrics,
        "epochs_completed": trainer.current_epoch,
        "global_step": trainer.global_step,
        "reported_epoch": "last",
        "seed": cfg.seed,
        "experiment": cfg.get("experiment_name"),
    }
    if smoke:
        why = "; ".join(smoke) if isinstance(smoke, list) else "synthetic data or fast_dev_run"
        record["NOT_A_RESULT"] = f"smoke test only ({why})"
    path = out_dir / (SMOKE_METRICS_FILE if smoke else METRICS_FILE)
    atomic_write_json(path, record)
    log.info("wrote %s", path)
    return path


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build everything from ``cfg``, fit, test the last-epoch weights, write metrics.

    The run directory (``paths.output_dir``) is locked for the run (:mod:`gkl.run_dir`); one that
    holds another run is refused unless ``ckpt_path`` resumes that run.
    """
    check_distributed(cfg.trainer)  # DDP on one process: fail before building anything
    check_inputs(cfg)
    out_dir = Path(cfg.paths.output_dir)
    lock = None
    if rank_zero_only.rank == 0:  # DDP's other processes share rank 0's run directory
        lock = RunLock(out_dir).acquire()
    if _USER_INDUCTOR_CACHE is None:  # never $TMPDIR/torchinductor_<user>
        os.environ[INDUCTOR_CACHE_ENV] = str((out_dir / INDUCTOR_CACHE_DIR).resolve())
    try:
        if lock is not None:
            check_run_directory(out_dir, cfg.get("ckpt_path"))
            remove_stale_temp_files(out_dir)
        return _fit_and_test(cfg, out_dir)
    except SIGTERMException:  # Lightning's own SIGTERM stop (e.g. in trainer.test) exits 0
        raise SystemExit(128 + signal.SIGTERM) from None
    except OSError as error:
        if error.errno in NO_SPACE and "no space left on device" not in str(error):
            raise OSError(
                error.errno,
                f"no space left on device while writing the run directory {out_dir} "
                f"({error.filename or error}); free space there or write elsewhere with "
                "hydra.run.dir=<dir>; resume from checkpoints/last.ckpt once there is room",
                error.filename,
            ) from error
        raise
    finally:
        if lock is not None:
            lock.release()


def _fit_and_test(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    config = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:  # before building anything: a safe, readable checkpoint of this config
        checkpoint = load_checkpoint(ckpt_path, mmap=True)
        check_lightning_checkpoint(checkpoint, ckpt_path)
        for key, old, new in check_resume_config(checkpoint, config, ckpt_path):
            log.warning("resuming with a changed config: %s: %r -> %r", key, old, new)
        check_resume_fingerprints(checkpoint, config, ckpt_path)
        del checkpoint
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    model = instantiate(cfg.model)
    teacher = build_teacher(cfg) if has_teacher(cfg) else None
    loss = instantiate(cfg.loss) if cfg.get("loss") else None
    check_class_counts(model, teacher, datamodule)
    task = build_task(cfg, model, teacher, loss, datamodule.num_classes)
    # Speed switches and DDP's rank-local buffers (gkl/tasks/speed.py, conf/speed/).
    apply_speed(task, cfg.get("speed"))
    exclude_rank_local_buffers(task)

    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks += [ResumeStateCallback(config), HistoryTrimCallback()]
    callbacks.append(InterruptCheckpoint(out_dir / "checkpoints"))  # SIGTERM / SIGINT
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[SafeCheckpointIO()]
    )
    if rank_zero_only.rank == 0:
        atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if ckpt_path:
        metrics |= _complete_finished_resume(trainer, task, datamodule, metrics)
    if cfg.get("test", True):
        # The weights after the last epoch: never a checkpoint selected on test accuracy.
        results = trainer.test(task, datamodule=datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in results[0].items()}
    if trainer.is_global_zero:
        finish_loggers(trainer)
    smoke = smoke_reasons(cfg, datamodule, trainer)
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        write_metrics(cfg, trainer, metrics, smoke)
        # Synthetic or fast_dev_run weights are never exported; a short or small real run's are.
        if cfg.get("export_weights") and not is_synthetic_or_dev_run(cfg, datamodule):
            export_weights(task.export_model, Path(cfg.export_weights))
    return metrics


def _complete_finished_resume(trainer: pl.Trainer, task, datamodule, metrics) -> dict[str, float]:
    """A checkpoint of a finished run resumes with nothing left to train: validate the final
    weights (the last epoch's validation) and write the run's own ``last.ckpt``."""
    added: dict[str, float] = {}
    if not metrics and trainer.limit_val_batches != 0:
        results = trainer.validate(task, datamodule=datamodule, verbose=False)
        added = {k: float(v) for k, v in results[0].items() if k.startswith("val/")}
    for callback in trainer.checkpoint_callbacks:
        dirpath, name = getattr(callback, "dirpath", None), getattr(callback, "filename", None)
        if dirpath and name == "last" and not Path(dirpath, "last.ckpt").exists():
            trainer.save_checkpoint(Path(dirpath) / "last.ckpt")
    return added


def export_weights(model: torch.nn.Module, path: Path) -> None:
    """Save the bare network as ``{"model": state_dict}`` (mdistiller's format), atomically."""
    network = getattr(model, "model", model)  # unwrap Normalized
    atomic_torch_save({"model": network.state_dict()}, path.expanduser())
    log.info("exported weights to %s", path)


def train(cfg: DictConfig) -> float | None:
    """``train.py``'s work after :func:`gkl.cli.main` checked the config: run, print the summary,
    return ``optimized_metric`` for sweepers."""
    keep_library_chatter_in_the_log()
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    metrics = run(cfg)
    print_run_summary(cfg, metrics, METRICS_FILE, SMOKE_METRICS_FILE)
    optimized = cfg.get("optimized_metric")
    return metrics.get(optimized) if optimized else None
