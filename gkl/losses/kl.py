"""KL-family losses on logits: plain KL, Hinton KD, TRADES KL, soft-label cross-entropy.

Notation: s = student (or adversarial) logits, t = teacher (or natural) logits, shape (B, C).
All losses average over the batch and reduce in float32 or wider.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validation import as_float32_or_wider, check_pair, check_positive


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """``mean_b KL(softmax(t_b / T) || softmax(s_b / T))``; gradients flow into both inputs."""
    check_pair(student_logits, teacher_logits, check_finite=check_finite)
    check_positive("temperature", temperature)
    s = as_float32_or_wider(student_logits) / temperature
    t = as_float32_or_wider(teacher_logits) / temperature
    log_p_t = F.log_softmax(t, dim=1)
    log_p_s = F.log_softmax(s, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 4.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Hinton KD: ``T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))``."""
    kl = kl_divergence(
        student_logits, teacher_logits, temperature=temperature, check_finite=check_finite
    )
    return temperature**2 * kl


def trades_kl(
    adversarial_logits: torch.Tensor,
    natural_logits: torch.Tensor,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """TRADES robust term: ``mean_b KL(softmax(f(x_b)) || softmax(f(x_adv_b)))``.

    Equals the TRADES code's ``KLDivLoss(reduction="sum")(log_softmax(adv), softmax(nat)) / B``;
    gradients flow into both branches.
    """
    check_pair(
        adversarial_logits,
        natural_logits,
        check_finite=check_finite,
        names=("adversarial_logits", "natural_logits"),
    )
    return kl_divergence(adversarial_logits, natural_logits, check_finite=False)


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """``mean_b( -sg(softmax(t_b / T)) . log_softmax(s_b / T) )``: no gradient into t."""
    check_pair(student_logits, teacher_logits, check_finite=check_finite)
    check_positive("temperature", temperature)
    s = as_float32_or_wider(student_logits) / temperature
    p_t = F.softmax(as_float32_or_wider(teacher_logits).detach() / temperature, dim=1)
    return -(p_t * F.log_softmax(s, dim=1)).sum(dim=1).mean()
