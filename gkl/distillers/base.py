"""The feature-distiller interface and the sum of several distillation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gkl.models.features import Features


class FeatureDistiller(nn.Module):
    """Base of the feature methods: ``feat_weight * loss(features)``.

    ``needs_features`` tells the task to run :func:`gkl.models.features.forward_with_features`
    on student and teacher. :meth:`setup` builds the learnable parts once the pair is known.
    """

    needs_features = True
    uses_teacher = True

    def __init__(self, feat_weight: float = 1.0) -> None:
        super().__init__()
        self.feat_weight = feat_weight

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        """Build the modules this method owns from the pair (no-op when it owns none)."""

    def feature_loss(
        self, student: Features, teacher: Features, student_logits: torch.Tensor
    ) -> torch.Tensor:
        """The unweighted loss of the method."""
        raise NotImplementedError

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        class_prior: torch.Tensor | None = None,
        *,
        student_features: Features,
        teacher_features: Features,
    ) -> torch.Tensor:
        return self.feat_weight * self.feature_loss(
            student_features, teacher_features, student_logits
        )


class LossSum(nn.Module):
    """``sum_i term_i(...)``: several distillation losses in one run (e.g. GKL + ReviewKD).

    Logit losses get ``(s, t, y, class_prior)``; feature distillers also get the features.
    ``use_class_prior`` / ``temperature2`` are those of the terms that use the prior.
    """

    def __init__(self, terms: Sequence[nn.Module] | dict[str, nn.Module]) -> None:
        super().__init__()
        if isinstance(terms, dict):
            terms = list(terms.values())
        if len(terms) < 2:
            raise ValueError(f"LossSum needs at least two terms, got {len(terms)}")
        self.terms = nn.ModuleList(terms)
        self.needs_features = any(getattr(t, "needs_features", False) for t in terms)
        users = [t for t in terms if getattr(t, "use_class_prior", False)]
        self.use_class_prior = bool(users)
        if users:
            self.temperature2 = users[0].temperature2

    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        """Set up every feature term."""
        for term in self.terms:
            if hasattr(term, "setup"):
                term.setup(student, teacher)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor,
        class_prior: torch.Tensor | None = None,
        *,
        student_features: Features | None = None,
        teacher_features: Features | None = None,
        **instance: torch.Tensor,
    ) -> torch.Tensor:
        total = 0.0
        for term in self.terms:
            if getattr(term, "needs_features", False):
                extra = instance if getattr(term, "needs_instance_sample", False) else {}
                total = total + term(
                    student_logits,
                    teacher_logits,
                    target,
                    class_prior,
                    student_features=student_features,
                    teacher_features=teacher_features,
                    **extra,
                )
            else:
                total = total + term(student_logits, teacher_logits, target, class_prior)
        return total


def loss_terms(loss: nn.Module) -> list[nn.Module]:
    """The terms of a :class:`LossSum`, else ``[loss]``."""
    return list(loss.terms) if isinstance(loss, LossSum) else [loss]
