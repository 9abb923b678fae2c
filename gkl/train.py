"""Training entry point: compose config -> data, models, loss, task -> Lightning fit/test."""

from __future__ import annotations

import inspect
import json
import logging
import os
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gkl.config import CONFIG_DIR
from gkl.data.build import build_datamodule
from gkl.losses import CrossEntropyLoss
from gkl.tasks.progress import print_run_summary
from gkl.tasks.speed import apply_speed, check_distributed, exclude_rank_local_buffers

log = logging.getLogger(__name__)

# gkl's data modules save and restore the position in the epoch themselves (ImageDataModule's
# state_dict), so Lightning's "dataloader is not resumable" warning does not apply.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")

SMOKE_METRICS_FILE = "metrics.smoke.json"
METRICS_FILE = "metrics.json"


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
    ``task.<key>`` its constructor lacks, is an error before training, not silently ignored.
    """
    task_factory = instantiate(cfg.task)
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


def is_smoke_test(cfg: DictConfig, datamodule) -> bool:
    return bool(getattr(datamodule, "is_synthetic", False) or cfg.trainer.get("fast_dev_run"))


def write_metrics(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float], smoke: bool):
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
        record["NOT_A_RESULT"] = "synthetic data or fast_dev_run: smoke test only"
    path = out_dir / (SMOKE_METRICS_FILE if smoke else METRICS_FILE)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return path


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build everything from ``cfg``, fit, test the last-epoch weights, write metrics."""
    check_distributed(cfg.trainer)  # DDP on one process: fail before building anything
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
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if cfg.get("test", True):
        # The weights after the last epoch: never a checkpoint selected on test accuracy.
        results = trainer.test(task, datamodule=datamodule, verbose=False)
        metrics |= {k: float(v) for k, v in results[0].items()}
    smoke = is_smoke_test(cfg, datamodule)
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        write_metrics(cfg, trainer, metrics, smoke)
        if cfg.get("export_weights") and not smoke:
            export_weights(task.export_model, Path(cfg.export_weights))
    return metrics


def export_weights(model: torch.nn.Module, path: Path) -> None:
    """Save the bare network as ``{"model": state_dict}`` (mdistiller's format), atomically."""
    network = getattr(model, "model", model)  # unwrap Normalized
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": network.state_dict()}, tmp)
    os.replace(tmp, path)
    log.info("exported weights to %s", path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision(cfg.get("matmul_precision", "highest"))
    metrics = run(cfg)
    print_run_summary(cfg, metrics, METRICS_FILE, SMOKE_METRICS_FILE)
    optimized = cfg.get("optimized_metric")
    return metrics.get(optimized) if optimized else None
