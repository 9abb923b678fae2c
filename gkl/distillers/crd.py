"""Contrastive representation distillation (Tian et al., ICLR 2020), mdistiller's ``CRD.py``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gkl.losses import feature as fl
from gkl.models.features import Features, pooled_feature_dim

from .base import FeatureDistiller


class Embed(nn.Module):
    """``normalize(linear(x))``: CRD's embedding head."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.reshape(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).sqrt()


class CRD(FeatureDistiller):
    """CRD on the pooled features: student and teacher embedding heads (``feat_dim``), two memory
    banks of ``num_data`` rows (student's ``memory_s``, teacher's ``memory_t``, uniform in
    ``+-1/sqrt(feat_dim / 3)`` at start), scores of the student embedding against the teacher
    memory and vice versa over each item's ``k + 1`` sampled rows, normalised by constants ``Z``
    fixed at the first batch (``mean score * num_data``), NCE loss on each side; after the loss
    the batch's rows are moved towards the new embeddings (``momentum``).

    The batch's ``index`` and ``sample_index`` come from the instance-sampling data
    (``data.instance_sample_k``, :mod:`gkl.data.instance_sample`); ``num_data`` (the training-set
    size) is set by the task at fit start (:meth:`set_num_data`), before a resume restores the
    memories.
    """

    needs_instance_sample = True

    def __init__(
        self,
        feat_weight: float = 0.8,
        feat_dim: int = 128,
        k: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        input_shape: Sequence[int] = (3, 32, 32),
    ) -> None:
        super().__init__(feat_weight)
        self.feat_dim, self.k = feat_dim, k
        self.temperature, self.momentum = temperature, momentum
        self.input_shape = tuple(input_shape)
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        self.num_data = 0

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        like = next(student.parameters())
        dims = [pooled_feature_dim(net, self.input_shape) for net in (student, teacher)]
        self.embed_s = Embed(dims[0], self.feat_dim).to(like)
        self.embed_t = Embed(dims[1], self.feat_dim).to(like)

    def set_num_data(self, num_data: int) -> None:
        """Create the memory banks for a training set of ``num_data`` items (idempotent)."""
        if self.num_data == num_data:
            return
        like = self.embed_s.linear.weight
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            memory = torch.rand(num_data, self.feat_dim, dtype=like.dtype) * 2 * stdv - stdv
            self.register_buffer(name, memory.to(like.device))
        self.register_buffer("z", torch.full((2,), -1.0, dtype=like.dtype, device=like.device))
        self.num_data = num_data

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        class_prior: torch.Tensor | None = None,
        *,
        student_features: Features,
        teacher_features: Features,
        index: torch.Tensor | None = None,
        sample_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if index is None or sample_index is None:
            raise ValueError(
                "CRD needs the instance-sampling training data (index, sample_index): set "
                "data.instance_sample_k (+baseline=crd does)"
            )
        if not self.num_data:
            raise RuntimeError("CRD.set_num_data(len(train_set)) must run before the first step")
        v_s = self.embed_s(student_features.pooled_feat)
        v_t = self.embed_t(teacher_features.pooled_feat)
        # student embedding vs the teacher memory, teacher embedding vs the student memory
        out_s = fl.contrast_scores(self.memory_t, v_s, sample_index, self.temperature)
        out_t = fl.contrast_scores(self.memory_s, v_t, sample_index, self.temperature)
        if self.z[0] < 0:
            self.z[0] = out_s.detach().mean() * self.num_data
            self.z[1] = out_t.detach().mean() * self.num_data
        loss = fl.nce_contrast_loss(out_s / self.z[0], self.num_data) + fl.nce_contrast_loss(
            out_t / self.z[1], self.num_data
        )
        fl.update_memory(self.memory_s, v_s.detach(), index, self.momentum)
        fl.update_memory(self.memory_t, v_t.detach(), index, self.momentum)
        return self.feat_weight * loss
