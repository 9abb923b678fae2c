"""Feature-distillation losses as pure functions (the formulas of mdistiller's distillers).

Features follow :class:`gkl.models.features.Features`: ``(B, C, H, W)`` stage maps, ``(B, D)``
pooled vectors. Where student and teacher maps differ in size, the larger is average-pooled to the
smaller (mdistiller's rule for AT, NST and VID). Stage lists of different lengths pair their
first stages (mdistiller's ``zip``). Teacher tensors are treated as constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def match_size(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two square maps to the other's size."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def fitnet_loss(regressed_student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: ``mean((r(f_s) - f_t)^2)`` with ``r`` the student's regressor."""
    return F.mse_loss(regressed_student, teacher)


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """AT's ``normalize(mean_c(f^p))`` flattened per sample, shape ``(B, H*W)``."""
    return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))


def at_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], p: float = 2.0
) -> torch.Tensor:
    """Attention transfer: ``sum_stages mean((a(f_s) - a(f_t))^2)``, ``a`` the
    :func:`attention_map`."""
    total = 0.0
    for f_s, f_t in zip(student, teacher, strict=False):
        f_s, f_t = match_size(f_s, f_t)
        total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
    return total


def sp_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Similarity preserving: ``sum_stages ||G_t - G_s||_F^2 / B^2``, ``G`` the row-normalised
    batch Gram matrix ``normalize(f f^T)`` of the flattened features."""
    total = 0.0
    for f_s, f_t in zip(student, teacher, strict=False):
        b = f_s.shape[0]
        g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).t())
        g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).t())
        total = total + (g_t - g_s).pow(2).sum() / (b * b)
    return total


def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer on pooled features.

    Cosine similarities ``c = x_i.x_j`` (``x = f / (|f| + eps)``) mapped to ``(c + 1) / 2`` and
    row-normalised into conditional distributions ``p_t``, ``p_s``; the loss is
    ``mean(p_t * log((p_t + eps) / (p_s + eps)))`` over all ``B^2`` entries.
    """

    def conditional(f: torch.Tensor) -> torch.Tensor:
        x = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        x = torch.nan_to_num(x, nan=0.0)
        sim = (x @ x.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s, p_t = conditional(f_s), conditional(f_t)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


def _pairwise_distance(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """``|e_i - e_j|`` (or its square) clamped at ``eps``, zero on the diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), dtype=d.dtype, device=d.device))


def _angles(e: torch.Tensor) -> torch.Tensor:
    """``<(e_i - e_j)/|.|, (e_k - e_j)/|.|>`` for all triples, flattened (``B^3``)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_loss(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
    squared: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Relational KD: ``w_d * huber(d_s/mean d_s, d_t/mean d_t) + w_a * huber(angles_s, angles_t)``.

    ``d`` the pairwise distances (mean over the positive entries), ``huber`` smooth-L1 (beta 1).
    """
    s = f_s.reshape(f_s.shape[0], -1)
    t = f_t.reshape(f_t.shape[0], -1).detach()
    d_t = _pairwise_distance(t, squared, eps)
    d_t = d_t / d_t[d_t > 0].mean()
    d_s = _pairwise_distance(s, squared, eps)
    d_s = d_s / d_s[d_s > 0].mean()
    loss_d = F.smooth_l1_loss(d_s, d_t)
    loss_a = F.smooth_l1_loss(_angles(s), _angles(t))
    return distance_weight * loss_d + angle_weight * loss_a


def nst_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Neuron selectivity transfer, squared MMD with the polynomial kernel ``k(a, b) = (a.b)^2``
    between the L2-normalised channel maps: ``mean k(t,t) + mean k(s,s) - 2 mean k(s,t)``."""
    total = 0.0
    for f_s, f_t in zip(student, teacher, strict=False):
        f_s, f_t = match_size(f_s, f_t)
        s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2).detach()
        k_tt = (t @ t.transpose(1, 2)).pow(2).mean()
        k_ss = (s @ s.transpose(1, 2)).pow(2).mean()
        k_st = (t @ s.transpose(1, 2)).pow(2).mean()
        total = total + k_tt + k_ss - 2 * k_st
    return total


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _top_svd(feat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised top-``k`` singular values ``(B, k)`` and right singular vectors ``(B, W, k)`` of
    each ``(C*H, W)`` view of a ``(B, C, H, W)`` map (mdistiller's reshaping)."""
    b, c, h, w = feat.shape
    _, s, v = torch.svd(feat.reshape(b, c * h, w))
    s = F.normalize(_finite(s)[:, :k], dim=1)
    v = F.normalize(_finite(v)[:, :, :k], dim=1)
    return s, v


def kdsvd_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], k: int = 1
) -> torch.Tensor:
    """KD-SVD: the teacher's top-``k`` right singular vectors and the student's (top ``k + 3``,
    sign-aligned to the teacher's by the largest |cosine|), scaled by the teacher's singular
    values; between consecutive stages an RBF ``exp(-(v_i - v_j)^2 / 8)`` of the vector entries;
    the loss is ``sum_stages sum (rbf_s - rbf_t)^2 / B``. Non-finite entries count as 0."""
    losses = []
    prev_s = prev_t = None
    for f_s, f_t in zip(student, teacher, strict=False):
        if f_s.shape[3] != f_t.shape[3]:
            raise ValueError(
                f"KDSVD compares right singular vectors, so student and teacher maps need the "
                f"same width; got {tuple(f_s.shape)} and {tuple(f_t.shape)}: use another method "
                "for this pair"
            )
        s_t, v_t = _top_svd(f_t, k)
        _, v_s = _top_svd(f_s, k + 3)
        cosine = v_s.transpose(-2, -1) @ v_t  # (B, k+3, k)
        best = cosine.abs().amax(dim=1, keepdim=True)
        mask = torch.where(best == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
        v_s = v_s @ mask
        v_t = v_t * s_t.unsqueeze(1)
        v_s = v_s * s_t.unsqueeze(1)
        if prev_s is not None:
            rbf_s = torch.exp(-(v_s.unsqueeze(2) - prev_s.unsqueeze(1)).pow(2) / 8)
            rbf_t = torch.exp(-(v_t.unsqueeze(2) - prev_t.unsqueeze(1)).pow(2) / 8)
            losses.append(_finite((rbf_s - rbf_t.detach()).pow(2)).sum())
        prev_s, prev_t = v_s, v_t
    return sum(losses) / student[0].shape[0]


def vid_loss(
    predicted_mean: torch.Tensor, log_scale: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """VID's Gaussian negative log-likelihood (constant dropped):
    ``mean(0.5 * ((mu - f_t)^2 / var + log var))`` with ``var = softplus(log_scale) + eps`` per
    channel."""
    var = (F.softplus(log_scale) + eps).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((predicted_mean - f_t) ** 2 / var + torch.log(var)))


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """OFD's per-channel margin ``E[x | x < 0]`` for ``x ~ N(m, s^2)`` (``s = |gamma|``, ``m =
    beta`` of the teacher's BN before ReLU): ``m - s phi(m/s) / Phi(-m/s)``, or ``-3 s`` where
    ``Phi(-m/s) <= 0.001``. Shape ``(1, C, 1, 1)``."""
    s = bn_weight.detach().abs().double()
    m = bn_bias.detach().double()
    cdf = torch.special.ndtr(-m / s)
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, -s * pdf / cdf + m, -3 * s)
    return margin.view(1, -1, 1, 1)


def ofd_feature_loss(
    student: torch.Tensor, teacher: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """OFD's partial L2 (per-sample sum, batch mean): ``(s - t)^2`` where ``t > 0`` or ``s > t``
    (``margin < t <= 0``), ``(s - margin)^2`` where ``s > margin >= t``; zero elsewhere."""
    margin = margin.to(student)
    loss = (
        (student - margin) ** 2 * ((student > margin) & (teacher <= margin))
        + (student - teacher) ** 2 * ((student > teacher) & (teacher > margin) & (teacher <= 0))
        + (student - teacher) ** 2 * (teacher > 0)
    )
    return loss.mean(dim=0).sum()


def hcl_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss: per level, ``MSE(f_s, f_t)`` plus the MSEs of the
    ``4x4, 2x2, 1x1`` average-pooled maps (those smaller than the map) with weights 1/2, 1/4, ...,
    divided by the sum of the weights; summed over levels."""
    total = 0.0
    for f_s, f_t in zip(student, teacher, strict=True):
        h = f_s.shape[2]
        loss = F.mse_loss(f_s, f_t)
        weight, weights = 1.0, 1.0
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2.0
            pooled_s = F.adaptive_avg_pool2d(f_s, (size, size))
            pooled_t = F.adaptive_avg_pool2d(f_t, (size, size))
            loss = loss + F.mse_loss(pooled_s, pooled_t) * weight
            weights += weight
        total = total + loss / weights
    return total


def contrast_scores(
    memory: torch.Tensor, embedding: torch.Tensor, sample_index: torch.Tensor, temperature: float
) -> torch.Tensor:
    """CRD's unnormalised scores ``exp(m_j . v / T)`` of each row ``v`` of ``embedding`` against
    the memory rows ``j`` of its ``sample_index`` (positive first), shape ``(B, K + 1)``."""
    b, d = embedding.shape
    weight = memory.index_select(0, sample_index.reshape(-1)).detach().view(b, -1, d)
    return torch.exp(torch.bmm(weight, embedding.view(b, d, 1)).squeeze(2) / temperature)


def nce_contrast_loss(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss on normalised scores ``P`` (positive in column 0, ``K`` negatives), noise
    ``Pn = 1 / num_data``: ``-(sum_i log(P_i0 / (P_i0 + K Pn + eps)) + sum_ij log(K Pn /
    (P_ij + K Pn + eps))) / B``."""
    b, m = scores.shape[0], scores.shape[1] - 1
    noise = m / float(num_data)
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / b


@torch.no_grad()
def update_memory(
    memory: torch.Tensor, embedding: torch.Tensor, index: torch.Tensor, momentum: float
) -> None:
    """CRD's memory bank update in place: ``m_i <- normalize(momentum m_i + (1 - momentum) v)``."""
    rows = memory.index_select(0, index) * momentum + embedding * (1 - momentum)
    memory.index_copy_(0, index, rows / rows.pow(2).sum(1, keepdim=True).sqrt())
