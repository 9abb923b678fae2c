"""mdistiller's feature distillers (``mdistiller/distillers/<Name>.py``) as gkl loss modules.

Defaults are mdistiller's CIFAR-100 settings (``engine/cfg.py`` and ``configs/cifar100/``);
the formulas are in :mod:`gkl.losses.feature`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gkl.losses import feature as fl
from gkl.models.features import (
    Features,
    bn_before_relu,
    feature_shapes,
    has_stem_feature,
    pooled_feature_dim,
)

from .base import FeatureDistiller


class ConvReg(nn.Module):
    """FitNet's regressor student map -> teacher map: conv (stride 2 when the student map is twice
    the teacher's, a stride-2 transposed conv when half, else a valid conv shrinking H) + BN +
    ReLU."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(
                f"FitNet cannot regress a {s_h}x{s_w} student map onto a {t_h}x{t_w} teacher map"
                "; choose another hint_layer"
            )
        self.bn = nn.BatchNorm2d(t_c)
        self.use_relu = use_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.use_relu else x


class FitNet(FeatureDistiller):
    """FitNets (Romero et al., 2015): ``feat_weight * MSE(ConvReg(f_s[h]), f_t[h])``."""

    def __init__(
        self,
        feat_weight: float = 100.0,
        hint_layer: int = 2,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        super().__init__(feat_weight)
        self.hint_layer = hint_layer
        self.input_shape = tuple(input_shape)
        self.conv_reg: ConvReg | None = None

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        s_shapes = feature_shapes(student, self.input_shape)
        t_shapes = feature_shapes(teacher, self.input_shape)
        if not -len(s_shapes) <= self.hint_layer < len(s_shapes):
            raise ValueError(f"hint_layer={self.hint_layer}: the student has {len(s_shapes)} feats")
        self.conv_reg = ConvReg(s_shapes[self.hint_layer], t_shapes[self.hint_layer]).to(
            next(student.parameters())
        )

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        regressed = self.conv_reg(student.feats[self.hint_layer])
        return fl.fitnet_loss(regressed, teacher.feats[self.hint_layer])


class AT(FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis, 2017) on ``feats[1:]``."""

    def __init__(self, feat_weight: float = 1000.0, p: float = 2.0) -> None:
        super().__init__(feat_weight)
        self.p = p

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.at_loss(student.feats[1:], teacher.feats[1:], self.p)


class SP(FeatureDistiller):
    """Similarity-preserving KD (Tung & Mori, 2019) on the last stage feature."""

    def __init__(self, feat_weight: float = 3000.0) -> None:
        super().__init__(feat_weight)

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.sp_loss([student.feats[-1]], [teacher.feats[-1]])


class PKT(FeatureDistiller):
    """Probabilistic knowledge transfer (Passalis & Tefas, 2018) on the pooled feature."""

    def __init__(self, feat_weight: float = 30000.0) -> None:
        super().__init__(feat_weight)

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.pkt_loss(student.pooled_feat, teacher.pooled_feat)


class RKD(FeatureDistiller):
    """Relational KD (Park et al., 2019), distance + angle terms on the pooled feature."""

    def __init__(
        self,
        feat_weight: float = 1.0,
        distance_weight: float = 25.0,
        angle_weight: float = 50.0,
        squared: bool = False,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(feat_weight)
        self.distance_weight, self.angle_weight = distance_weight, angle_weight
        self.squared, self.eps = squared, eps

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.rkd_loss(
            student.pooled_feat,
            teacher.pooled_feat,
            self.distance_weight,
            self.angle_weight,
            self.squared,
            self.eps,
        )


class NST(FeatureDistiller):
    """Neuron selectivity transfer (Huang & Wang, 2017) on ``feats[1:]``."""

    def __init__(self, feat_weight: float = 50.0) -> None:
        super().__init__(feat_weight)

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.nst_loss(student.feats[1:], teacher.feats[1:])


class KDSVD(FeatureDistiller):
    """KD via SVD (Lee et al., 2018) on ``feats[1:]`` with ``k`` singular vectors."""

    def __init__(self, feat_weight: float = 1.0, k: int = 1) -> None:
        super().__init__(feat_weight)
        self.k = k

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        return fl.kdsvd_loss(student.feats[1:], teacher.feats[1:], self.k)


class VID(FeatureDistiller):
    """Variational information distillation (Ahn et al., 2019) on ``feats[1:]``.

    Per stage a regressor ``1x1 conv-ReLU-1x1 conv-ReLU-1x1 conv`` (student -> teacher channels)
    predicts the mean and a learnable per-channel ``log_scale`` (``softplus(log_scale) + eps`` is
    the variance, initialised to ``init_pred_var``) as in the VID authors' code; mdistiller keeps
    the log-scales in a plain list, outside its optimiser.
    """

    def __init__(
        self,
        feat_weight: float = 1.0,
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        super().__init__(feat_weight)
        self.init_pred_var, self.eps = init_pred_var, eps
        self.input_shape = tuple(input_shape)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        s_channels = [s[1] for s in feature_shapes(student, self.input_shape)[1:]]
        t_channels = [s[1] for s in feature_shapes(teacher, self.input_shape)[1:]]
        like = next(student.parameters())
        init = math.log(math.exp(self.init_pred_var - self.eps) - 1.0)
        for s, t in zip(s_channels, t_channels, strict=False):
            self.regressors.append(
                nn.Sequential(
                    nn.Conv2d(s, t, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(t, t, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(t, t, 1, bias=False),
                ).to(like)
            )
            self.log_scales.append(nn.Parameter(torch.full((t,), init).to(like)))

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        total = 0.0
        stages = zip(
            student.feats[1:], teacher.feats[1:], self.regressors, self.log_scales, strict=False
        )
        for f_s, f_t, regressor, log_scale in stages:
            f_s, f_t = fl.match_size(f_s, f_t)
            total = total + fl.vid_loss(regressor(f_s), log_scale, f_t, self.eps)
        return total


class OFD(FeatureDistiller):
    """Overhaul of feature distillation (Heo et al., 2019) on ``preact_feats[1:]``.

    Connectors ``conv(k x k, no bias) + BN`` map student to teacher channels; the teacher's
    pre-ReLU maps (average-pooled to the student's size) are matched with the partial L2 of
    :func:`gkl.losses.feature.ofd_feature_loss` against margins from the teacher's BN before ReLU,
    stage ``i`` of ``n`` weighted ``1 / 2^(n - i - 1)``. The teacher stays in eval mode here
    (mdistiller's OFD switches it to train mode, BN on batch statistics).
    """

    def __init__(
        self,
        feat_weight: float = 0.001,
        kernel_size: int = 1,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        super().__init__(feat_weight)
        self.kernel_size = kernel_size
        self.input_shape = tuple(input_shape)
        self.connectors = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        s_channels = [s[1] for s in feature_shapes(student, self.input_shape)[1:]]
        t_channels = [s[1] for s in feature_shapes(teacher, self.input_shape)[1:]]
        n = min(len(s_channels), len(t_channels))
        like = next(student.parameters())
        for s, t in zip(s_channels[-n:], t_channels[-n:], strict=True):
            conv = nn.Conv2d(
                s, t, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False
            )
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (self.kernel_size**2 * t)))
            self.connectors.append(nn.Sequential(conv, nn.BatchNorm2d(t)).to(like))
        for i, bn in enumerate(bn_before_relu(teacher)[-n:]):
            margin = fl.ofd_margin(bn.weight, bn.bias).to(like)
            self.register_buffer(f"margin{i}", margin)

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        n = len(self.connectors)
        total = 0.0
        stages = zip(
            student.preact_feats[-n:], teacher.preact_feats[-n:], self.connectors, strict=False
        )
        for i, (f_s, f_t, connector) in enumerate(stages):
            s = connector(f_s)
            t = F.adaptive_avg_pool2d(f_t, s.shape[-2:])
            margin = getattr(self, f"margin{i}")
            total = total + fl.ofd_feature_loss(s, t, margin) / 2 ** (n - i - 1)
        return total


class ABF(nn.Module):
    """ReviewKD's attention-based fusion: ``x = BN(1x1 conv x)``; with a residual ``y`` (the
    deeper level, upsampled nearest to ``shape``) ``x = x * a0 + y * a1`` with ``a =
    sigmoid(1x1 conv [x, y])``; resized to ``out_shape``; returns ``(BN(3x3 conv x), x)``."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid_channel),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channel),
        )
        self.att_conv = (
            nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
            if fuse
            else None
        )
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor | None, shape: int, out_shape: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


class ReviewKD(FeatureDistiller):
    """Knowledge review (Chen et al., 2021): the student's ``feats[1:]`` and pooled feature, fused
    from the deepest level up by :class:`ABF` modules, matched to the teacher's
    ``preact_feats[1:]`` and pooled feature by :func:`gkl.losses.feature.hcl_loss`.

    Channels and sizes (mdistiller's ``IN/OUT_CHANNELS``, ``SHAPES``, ``OUT_SHAPES``) are read from
    the pair; the mid width is ``min(512, in_channels[-1])``. The warm-up (20 epochs on CIFAR) is
    the task's ``warmup_epochs``. A student whose ``feats`` have no stem entry (mdistiller's
    MobileNetV1) gives all its ``feats``, as mdistiller's ReviewKD does (it uses the student's
    deepest ``len(teacher stages)`` feats).
    """

    def __init__(
        self,
        feat_weight: float = 5.0,
        stu_preact: bool = False,
        max_mid_channel: int = 512,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        super().__init__(feat_weight)
        self.stu_preact = stu_preact
        self.max_mid_channel = max_mid_channel
        self.input_shape = tuple(input_shape)
        self.abfs = nn.ModuleList()
        self.student_start = 1  # feats[1:]: the stem is not a level
        self.shapes: list[int] = []
        self.out_shapes: list[int] = []

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student_start = 1 if has_stem_feature(student) else 0
        s_shapes = feature_shapes(student, self.input_shape)[self.student_start :]
        t_shapes = feature_shapes(teacher, self.input_shape)[1:]
        if len(s_shapes) != len(t_shapes):
            raise ValueError(
                f"ReviewKD pairs stages one to one: the student has {len(s_shapes)} stages, "
                f"the teacher {len(t_shapes)}"
            )
        in_channels = [s[1] for s in s_shapes] + [pooled_feature_dim(student, self.input_shape)]
        out_channels = [t[1] for t in t_shapes] + [pooled_feature_dim(teacher, self.input_shape)]
        self.shapes = [1] + [s[2] for s in reversed(s_shapes)]
        self.out_shapes = [1] + [t[2] for t in reversed(t_shapes)]
        mid = min(self.max_mid_channel, in_channels[-1])
        like = next(student.parameters())
        abfs = [
            ABF(c_in, mid, c_out, i < len(in_channels) - 1)
            for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels, strict=True))
        ]
        self.abfs.extend(m.to(like) for m in reversed(abfs))

    def fused_features(self, student: Features) -> list[torch.Tensor]:
        """The student's fused features, shallowest first (one per teacher target)."""
        stages = student.preact_feats if self.stu_preact else student.feats
        x = [*stages[self.student_start :], student.pooled_feat[:, :, None, None]][::-1]
        out, residual = self.abfs[0](x[0], None, self.shapes[0], self.out_shapes[0])
        results = [out]
        levels = zip(x[1:], self.abfs[1:], self.shapes[1:], self.out_shapes[1:], strict=True)
        for feat, abf, shape, out_shape in levels:
            out, residual = abf(feat, residual, shape, out_shape)
            results.insert(0, out)
        return results

    def feature_loss(self, student: Features, teacher: Features, student_logits) -> torch.Tensor:
        targets = [*teacher.preact_feats[1:], teacher.pooled_feat[:, :, None, None]]
        return fl.hcl_loss(self.fused_features(student), targets)
