"""Loss modules with one calling convention; configs choose one by ``_target_`` (conf/loss/).

Every module is called as ``loss(student_logits, teacher_logits, target, class_prior=None)``;
``teacher_logits`` are the teacher's (distillation) or the natural branch's (adversarial training).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import as_float32_or_wider, check_non_negative, check_positive
from .dkd import dkd_loss
from .gkl import dkl_loss, gkl_loss
from .kl import kd_loss, trades_kl


def _check_options(loss: str, weights: tuple[float, ...], temperatures: tuple[float, ...]) -> None:
    """Refuse a bad weight (``alpha, beta[, gamma]``: finite, >= 0) or temperature (finite, > 0)
    when the module is built, naming it as ``<loss>.<argument>``."""
    for name, value in zip(("alpha", "beta", "gamma"), weights, strict=False):
        check_non_negative(f"{loss}.{name}", value)
    for name, value in zip(("temperature", "temperature2"), temperatures, strict=False):
        check_positive(f"{loss}.{name}", value)


class CrossEntropyLoss(nn.Module):
    """``CE(s, y)``: the no-distillation baseline; ignores the teacher."""

    uses_teacher = False

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        return F.cross_entropy(as_float32_or_wider(student_logits), target)


class KDLoss(nn.Module):
    """Hinton KD, ``T^2 * KL(softmax(t/T) || softmax(s/T))``."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        check_positive("KDLoss.temperature", temperature)
        self.temperature = temperature

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        return kd_loss(student_logits, teacher_logits, temperature=self.temperature)


class DKDLoss(nn.Module):
    """Decoupled KD, ``alpha * TCKD + beta * NCKD``."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        _check_options("DKDLoss", (alpha, beta), (temperature,))
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        return dkd_loss(
            student_logits,
            teacher_logits,
            target,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
        )


class DKLLoss(nn.Module):
    """Decoupled KL (asymmetric; gradient-equivalent to KL)."""

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        _check_options("DKLLoss", (alpha, beta), (temperature,))
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        return dkl_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            alpha=self.alpha,
            beta=self.beta,
        )


class GKLLoss(nn.Module):
    """Generalized KL, ``beta * wMSE + alpha * soft_CE``; ``class_prior`` rows enable the GI form.

    ``use_class_prior`` tells the training task to maintain a :class:`ClassPrior` (with
    ``temperature2``) and pass its rows; without it the weights are ``softmax(t / T2) ** gamma``
    and rows passed anyway are an error (they would be ignored).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 4.0,
        temperature2: float = 1.0,
        use_class_prior: bool = False,
    ) -> None:
        super().__init__()
        _check_options("GKLLoss", (alpha, beta, gamma), (temperature, temperature2))
        self.alpha, self.beta, self.gamma = alpha, beta, gamma
        self.temperature, self.temperature2 = temperature, temperature2
        self.use_class_prior = use_class_prior

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        if self.use_class_prior and class_prior is None:
            raise ValueError("GKLLoss(use_class_prior=True) needs class_prior rows (B, C)")
        if not self.use_class_prior and class_prior is not None:
            raise ValueError(
                "GKLLoss(use_class_prior=False) was given class_prior rows, which it would "
                "ignore: build it with use_class_prior=True (loss.use_class_prior=true) to weight "
                "by the class prior, or pass class_prior=None"
            )
        return gkl_loss(
            student_logits,
            teacher_logits,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            temperature=self.temperature,
            temperature2=self.temperature2,
            class_prior=class_prior,
        )


class TradesKLLoss(nn.Module):
    """TRADES robust term ``KL(f(x) || f(x_adv))``, called as (adversarial, natural, target)."""

    def forward(self, student_logits, teacher_logits, target, class_prior=None) -> torch.Tensor:
        return trades_kl(student_logits, teacher_logits)
