"""Lightning tasks: classification, distillation, adversarial training."""

from .adversarial import AdversarialTask
from .callbacks import RNGStateCallback
from .classify import ClassificationTask
from .distill import DistillationTask
from .optim import epoch_scheduler

__all__ = [
    "AdversarialTask",
    "ClassificationTask",
    "DistillationTask",
    "RNGStateCallback",
    "epoch_scheduler",
]
