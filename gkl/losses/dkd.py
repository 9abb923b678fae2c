"""Decoupled Knowledge Distillation (Zhao et al. 2022), as defined by mdistiller."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import (
    as_float32_or_wider,
    check_non_negative,
    check_pair,
    check_positive,
    check_target,
)
from .kl import kl_divergence


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD``, each ``T^2 * mean_b KL`` as in mdistiller.

    TCKD: KL between the binary distributions ``[p_target, 1 - p_target]`` of teacher and student.
    NCKD: KL between the softmax over the non-target classes only (target class masked out).
    ``check_finite=False`` skips the data-dependent checks (non-finite logits, label range).
    """
    check_pair(student_logits, teacher_logits, check_finite=check_finite)
    check_target(target, student_logits, check_range=check_finite)
    check_positive("temperature", temperature)
    check_non_negative("alpha", alpha)
    check_non_negative("beta", beta)
    s = as_float32_or_wider(student_logits) / temperature
    t = as_float32_or_wider(teacher_logits) / temperature
    batch, classes = s.shape
    if classes < 2:
        raise ValueError(f"dkd_loss needs >= 2 classes, got logits of shape {(batch, classes)}")
    target_mask = F.one_hot(target.long(), classes).bool()

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target logit (B,), non-target logits (B, C-1)) without masking tricks."""
        return logits[target_mask], logits[~target_mask].view(batch, classes - 1)

    def binary_logits(logits: torch.Tensor) -> torch.Tensor:
        """Logits whose softmax is ``[p_target, 1 - p_target]``."""
        target_logit, other = split(logits)
        return torch.stack([target_logit, torch.logsumexp(other, dim=1)], dim=1)

    tckd = kl_divergence(binary_logits(s), binary_logits(t), check_finite=False)
    nckd = kl_divergence(split(s)[1], split(t)[1], check_finite=False)
    return temperature**2 * (alpha * tckd + beta * nckd)
