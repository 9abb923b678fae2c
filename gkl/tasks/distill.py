"""Knowledge distillation task: frozen teacher -> student with a selectable loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from gkl.checks import check_count, check_non_negative_number
from gkl.distillers import loss_terms
from gkl.losses import class_prior_for
from gkl.models.features import forward_with_features
from gkl.models.wrappers import FrozenTeacher

from .classify import ClassificationTask, OptimizerFactory, SchedulerFactory


class DistillationTask(ClassificationTask):
    """``loss = ce_weight * CE(s, y) + distill_weight * min((epoch + 1) / warmup_epochs, 1) *
    distill(s, t, y)``.

    The teacher is wrapped in :class:`FrozenTeacher` (eval mode, no grad, excluded from the
    optimiser and, unless ``save_teacher``, from checkpoints). When the distillation loss has
    ``use_class_prior`` (GKL with class-wise global information), a :class:`ClassPrior` accumulates
    the teacher's ``softmax(t / temperature2)`` per true class and is refreshed at each epoch end.
    The warm-up is the authors' (mdistiller's) ``min(epoch / warmup, 1)`` with 1-based epochs.
    ``cache_teacher_outputs`` has the data module compute the teacher's logits on the
    (un-augmented) training set once at fit start and serve them with the batches
    (:meth:`ImageDataModule.serve_teacher_logits`) instead of running the teacher every step.

    A loss with ``needs_features`` (:mod:`gkl.distillers`) gets both networks' features
    (:func:`gkl.models.features.forward_with_features`); its ``setup(student, teacher)`` builds
    the modules it owns, which train with the student through the same optimiser, are saved and
    resumed with the run (``distill_loss.*``) and stay out of the exported student weights.
    """

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module,
        loss: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        ce_weight: float = 1.0,
        distill_weight: float = 1.0,
        warmup_epochs: int = 0,
        save_teacher: bool = False,
        cache_teacher_outputs: bool = False,
    ) -> None:
        if not getattr(loss, "uses_teacher", True):
            raise ValueError(
                f"{type(loss).__name__} ignores the teacher; for a CE-only baseline use "
                "task=classify teacher=none"
            )
        self.needs_features = bool(getattr(loss, "needs_features", False))
        if self.needs_features and cache_teacher_outputs:
            raise ValueError(
                f"task.cache_teacher_outputs=true serves cached teacher logits, but "
                f"{type(loss).__name__} distils the teacher's intermediate features, which are "
                "not cached: set task.cache_teacher_outputs=false"
            )
        super().__init__(model, num_classes, optimizer, scheduler)
        check_non_negative_number("task.ce_weight", ce_weight)
        check_non_negative_number("task.distill_weight", distill_weight)
        check_count("task.warmup_epochs", warmup_epochs, minimum=0, hint=" (0: no warm-up)")
        self.teacher = teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher)
        if self.needs_features:
            loss.setup(model, self.teacher)
        self.distill_loss = loss
        self.ce_weight = ce_weight
        self.distill_scale = distill_weight
        self.warmup_epochs = warmup_epochs
        self.save_teacher = save_teacher
        self.cache_teacher_outputs = cache_teacher_outputs
        self.class_prior = class_prior_for(num_classes, *loss_terms(loss))
        self.teacher_val_acc = MulticlassAccuracy(num_classes, average="micro")

    def distill_weight(self) -> float:
        """``distill_weight * min((epoch + 1) / warmup_epochs, 1)`` (0-based ``epoch``)."""
        if self.warmup_epochs <= 0:
            return self.distill_scale
        return self.distill_scale * min((self.current_epoch + 1) / self.warmup_epochs, 1.0)

    def setup(self, stage: str) -> None:
        """CRD: size the memory banks by the training set (before a resume restores them)."""
        users = [t for t in loss_terms(self.distill_loss) if hasattr(t, "set_num_data")]
        if stage != "fit" or all(t.num_data for t in users):  # none, or sized by the caller
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        sampling = getattr(datamodule, "instance_sample", (None,))
        if sampling[0] is None:
            raise ValueError(
                "CRD needs the instance-sampling training data: set data.instance_sample_k "
                "(mdistiller: 16384; +baseline=crd sets it) on a gkl.data.ImageDataModule"
            )
        for term in users:
            term.set_num_data(len(datamodule.train_set))

    def on_fit_start(self) -> None:
        if not self.cache_teacher_outputs:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "serve_teacher_logits"):
            raise ValueError(
                "task.cache_teacher_outputs=true needs a data module that serves cached teacher "
                f"logits (gkl.data.ImageDataModule); {type(datamodule).__name__} does not: set "
                "task.cache_teacher_outputs=false"
            )
        datamodule.serve_teacher_logits(self.teacher, self.device)

    def compute_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        **instance: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, student logits, {"ce", "distill"})`` of one batch (teacher run if needed);
        ``instance``: CRD's ``index`` and ``sample_index`` of the batch."""
        features: dict[str, Any] = dict(instance)
        if self.needs_features:
            teacher_logits, features["teacher_features"] = forward_with_features(self.teacher, x)
            logits, features["student_features"] = forward_with_features(self.model, x)
        else:
            if teacher_logits is None:
                teacher_logits = self.teacher(x)
            logits = self.model(x)
        rows = self.class_prior.rows(y, logits.dtype) if self.class_prior is not None else None
        ce = F.cross_entropy(logits, y)
        distill = self.distill_loss(logits, teacher_logits, y, class_prior=rows, **features)
        loss = self.ce_weight * ce + self.distill_weight() * distill
        if self.class_prior is not None:
            self.class_prior.update(teacher_logits, y)
        return loss, logits, {"ce": ce, "distill": distill}

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int):
        instance: dict[str, torch.Tensor] = {}
        if len(batch) == 3:  # cached teacher outputs
            x, y, teacher_logits = batch
        elif len(batch) == 4:  # CRD's instance sampling (gkl.data.instance_sample)
            x, y, instance["index"], instance["sample_index"] = batch
            teacher_logits = None
        else:
            (x, y), teacher_logits = batch, None
        loss, logits, parts = self.compute_loss(x, y, teacher_logits, **instance)
        self.log_train(loss, logits, y, parts)
        return loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters, then those of the distiller's own modules (if any)."""
        extra = [p for p in self.distill_loss.parameters() if p.requires_grad]
        return super().trainable_parameters() + extra

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.current_epoch == 0:  # the teacher is frozen: its accuracy is measured once
            x, y = batch
            self.teacher_val_acc(self.teacher(x), y)
            self.log("val/teacher_acc", self.teacher_val_acc, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.save_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        if not any(k.startswith("teacher.") for k in state):
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
