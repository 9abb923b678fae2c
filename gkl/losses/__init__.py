"""Losses on logits: pure functions, thin ``nn.Module`` wrappers, and a registry by name."""

from .dkd import dkd_loss
from .gkl import dkl_loss, gkl_loss
from .kl import kd_loss, kl_divergence, soft_cross_entropy, trades_kl
from .prior import ClassPrior
from .registry import (
    LOSSES,
    CrossEntropyLoss,
    DKDLoss,
    DKLLoss,
    GKLLoss,
    KDLoss,
    TradesKLLoss,
    build_loss,
    register_loss,
)

__all__ = [
    "LOSSES",
    "ClassPrior",
    "CrossEntropyLoss",
    "DKDLoss",
    "DKLLoss",
    "GKLLoss",
    "KDLoss",
    "TradesKLLoss",
    "build_loss",
    "dkd_loss",
    "dkl_loss",
    "gkl_loss",
    "kd_loss",
    "kl_divergence",
    "register_loss",
    "soft_cross_entropy",
    "trades_kl",
]
