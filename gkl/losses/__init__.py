"""Losses on logits: pure functions and thin ``nn.Module`` wrappers (chosen by ``_target_``)."""

from .dkd import dkd_loss
from .gkl import dkl_loss, gkl_loss
from .kl import kd_loss, kl_divergence, soft_cross_entropy, trades_kl
from .modules import CrossEntropyLoss, DKDLoss, DKLLoss, GKLLoss, KDLoss, TradesKLLoss
from .prior import ClassPrior, class_prior_for, class_priors

__all__ = [
    "ClassPrior",
    "CrossEntropyLoss",
    "DKDLoss",
    "DKLLoss",
    "GKLLoss",
    "KDLoss",
    "TradesKLLoss",
    "class_prior_for",
    "class_priors",
    "dkd_loss",
    "dkl_loss",
    "gkl_loss",
    "kd_loss",
    "kl_divergence",
    "soft_cross_entropy",
    "trades_kl",
]
