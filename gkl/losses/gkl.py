"""Decoupled and Generalized KL losses (Cui et al., "Generalized Kullback-Leibler Divergence Loss").

Notation: s = student (adversarial) logits, t = teacher (natural) logits, shape (B, C).

The weighted MSE over all pairwise logit differences,
``sum_{j,k} w_j w_k (d_j - d_k)^2`` with ``d = t - s``, factorises:
``= 2 [ (sum_j w_j)(sum_j w_j d_j^2) - (sum_j w_j d_j)^2 ] = 2 W sum_j w_j (d_j - m)^2``
with ``W = sum_j w_j`` and the weighted mean ``m = sum_j w_j d_j / W``. Both losses use that closed
form: O(B*C) time and memory instead of the B x C x C tensors of the reference code, same value and
gradients (centring on ``m`` keeps it free of cancellation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._validation import (
    as_float32_or_wider,
    check_non_negative,
    check_pair,
    check_positive,
)
from .kl import soft_cross_entropy


class _PairwiseWeightedSquares(torch.autograd.Function):
    """``sum_b 1/4 sum_{j,k} w_bj w_bk (d_bj - d_bk)^2 = sum_b 1/2 W_b sum_j w_bj (d_bj - m_b)^2``.

    ``W_b = sum_j w_bj``, ``m_b = sum_j w_bj d_bj / W_b``; ``w`` is a constant. The gradient is
    ``W_b w_bj (d_bj - m_b)`` (the derivative through ``m_b`` vanishes), so a hand-written backward
    replaces autograd's chain of element-wise ops with one multiply.
    """

    @staticmethod
    def forward(ctx, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        total = w.sum(dim=1, keepdim=True)
        mean = (w * d).sum(dim=1, keepdim=True) / total.clamp_min(torch.finfo(w.dtype).tiny)
        weighted_residual = w * (d - mean)
        ctx.save_for_backward(weighted_residual, total)
        return 0.5 * (total.squeeze(1) * (weighted_residual * (d - mean)).sum(dim=1)).sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        weighted_residual, total = ctx.saved_tensors
        return weighted_residual * (total * grad_output), None


def _pairwise_wmse_sum(d: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum_b 1/4 sum_{j,k} w_bj w_bk (d_bj - d_bk)^2, sum_b (sum_j w_bj)^2)``."""
    return _PairwiseWeightedSquares.apply(d, w), w.sum(dim=1).square().sum()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_j a_bj b_bj`` as a (B, 1) column, without a (B, C) temporary."""
    return torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)


class _FusedGKL(torch.autograd.Function):
    """GKL's value and gradients in one forward pass; backward only scales them.

    With ``w`` and ``q = softmax(t / T)`` constants, ``d = t - s``, ``W_b = sum_j w_bj``,
    ``m_b = sum_j w_bj d_bj / W_b``, ``N = sum_b W_b^2`` and ``g = beta/N W_b w_bj (d_bj - m_b)``
    (the wMSE gradient with respect to ``d``; the derivative through ``m_b`` vanishes):
    ``dL/ds = alpha/(B T) (softmax(s / T) - q) - g`` and ``dL/dt = g`` (soft CE has no teacher
    gradient). Forward saves one (B, C) tensor per input that needs a gradient: with a frozen
    teacher only the student's, and no teacher-side buffers at all.
    """

    @staticmethod
    def forward(ctx, s, t, w, alpha: float, beta: float, temperature: float) -> torch.Tensor:
        batch = s.shape[0]
        total = w.sum(dim=1, keepdim=True)
        normaliser = total.square().sum()
        centred = t - s
        mean = _row_dot(w, centred) / total.clamp_min(torch.finfo(w.dtype).tiny)
        centred.sub_(mean)
        weighted_residual = w * centred
        pairwise = 0.5 * (total * _row_dot(weighted_residual, centred)).sum()
        q = F.softmax(t / temperature, dim=1)
        x = s / temperature
        p_s = F.softmax(x, dim=1)
        # soft_CE = mean_b(lse_b - q_b . x_b) (q_b sums to 1); lse_b = max_j x_bj - log max_j p_bj.
        log_sum_exp = x.amax(dim=1) - p_s.amax(dim=1).log()
        soft_ce = (log_sum_exp.sum() - torch.dot(q.view(-1), x.view(-1))) / batch
        wmse_grad = weighted_residual.mul_(total * (beta / normaliser))  # g, in place
        # dL/ds = c (p_s - q) - g, c = alpha / (B T), built in p_s's buffer.
        scale = alpha / (batch * temperature)
        grad_s = p_s.mul_(scale).add_(q, alpha=-scale).sub_(wmse_grad)
        ctx.save_for_backward(grad_s, wmse_grad if ctx.needs_input_grad[1] else None)
        return beta * pairwise / normaliser + alpha * soft_ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        grad_s, grad_t = ctx.saved_tensors
        grad_s = grad_s * grad_output if ctx.needs_input_grad[0] else None
        grad_t = grad_t * grad_output if grad_t is not None else None
        return grad_s, grad_t, None, None, None, None


def _check_class_prior(class_prior: torch.Tensor, logits: torch.Tensor, check_finite: bool) -> None:
    if not isinstance(class_prior, torch.Tensor) or not class_prior.is_floating_point():
        got = class_prior.dtype if isinstance(class_prior, torch.Tensor) else type(class_prior)
        raise ValueError(f"class_prior must be a floating-point tensor, got {got}")
    if class_prior.shape != logits.shape:
        raise ValueError(
            f"class_prior must have the logits' shape {tuple(logits.shape)} (one prior row per "
            f"sample, e.g. ClassPrior.rows(target)), got {tuple(class_prior.shape)}"
        )
    if check_finite:
        negative = (class_prior < 0).sum().item()
        if negative:
            raise ValueError(f"class_prior has {negative} negative entries; weights must be >= 0")
        bad = (~torch.isfinite(class_prior)).sum().item()
        if bad:
            raise ValueError(f"class_prior has {bad} non-finite entries")
        empty = (class_prior.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(
                f"class_prior rows {empty[:10]} (of {class_prior.shape[0]}) are all zero: a row "
                "must be a distribution over classes. Pass ClassPrior.rows(target) (its rows "
                "start uniform and stay normalised) or row-normalise the matrix you pass"
            )


def gkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    gamma: float,
    temperature: float,
    temperature2: float = 1.0,
    class_prior: torch.Tensor | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """GKL loss (the authors' v2): ``beta * wMSE + alpha * soft_CE``.

    - ``d = t - s`` (raw logits); weights ``w = p ** gamma`` under no_grad, with
      ``p = softmax(t / temperature2)`` (sample-wise) or ``p = class_prior`` (the class-prior rows
      picked by each sample's label, shape (B, C)).
    - ``wMSE = 1/4 sum_b sum_{j,k} w_bj w_bk (d_bj - d_bk)^2 / sum_b sum_{j,k} w_bj w_bk``;
      gradients flow into both s and t (asymmetry broken).
    - ``soft_CE = mean_b( -sg(softmax(t_b / T)) . log_softmax(s_b / T) )`` (no T^2 factor).

    Value and gradients come from one fused pass (:class:`_FusedGKL`); with a frozen teacher
    (``teacher_logits.requires_grad`` False) nothing is computed or stored for the teacher's
    gradient. ``check_finite=False`` skips the data-dependent checks (non-finite
    logits, negative or all-zero prior rows), which synchronise with the device.
    """
    check_pair(student_logits, teacher_logits, check_finite=check_finite)
    check_positive("temperature", temperature)
    check_positive("temperature2", temperature2)
    check_non_negative("alpha", alpha)
    check_non_negative("beta", beta)
    check_non_negative("gamma", gamma)
    dtype = torch.promote_types(
        as_float32_or_wider(student_logits).dtype, as_float32_or_wider(teacher_logits).dtype
    )
    s, t = student_logits.to(dtype), teacher_logits.to(dtype)
    with torch.no_grad():
        if class_prior is None:
            p = F.softmax(t if temperature2 == 1 else t / temperature2, dim=1)
        else:
            _check_class_prior(class_prior, s, check_finite)
            p = class_prior.to(dtype)
        w = p if gamma == 1 else p.pow(gamma)
    return _FusedGKL.apply(s, t, w, float(alpha), float(beta), float(temperature))


def dkl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """Decoupled KL: the paper's gradient-equivalent form of ``KL(softmax(t/T) || softmax(s/T))``.

    ``beta * 1/4 sum_{j,k} w_j w_k ((t_j - t_k) - sg(s_j - s_k))^2 + alpha * soft_CE``, per-sample
    mean, logits divided by T, ``w = sg(softmax(t/T))``. With ``alpha = beta = 1`` its gradient
    with respect to t equals KL's (the wMSE term, stop-gradient on the student side) and its
    gradient with respect to s equals KL's (the soft-label CE term). This is the asymmetric
    property that GKL breaks: when t is a frozen teacher, the wMSE term does nothing.
    """
    check_pair(student_logits, teacher_logits, check_finite=check_finite)
    check_positive("temperature", temperature)
    check_non_negative("alpha", alpha)
    check_non_negative("beta", beta)
    s = as_float32_or_wider(student_logits) / temperature
    t = as_float32_or_wider(teacher_logits) / temperature
    with torch.no_grad():
        w = F.softmax(t, dim=1)
    pairwise, _ = _pairwise_wmse_sum(t - s.detach(), w)
    wmse = pairwise / s.shape[0]
    return beta * wmse + alpha * soft_cross_entropy(s, t, check_finite=False)
