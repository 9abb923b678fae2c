"""Feature distillers of mdistiller as loss modules, chosen by ``+baseline=<name>``.

Each module is called like the logit losses plus the two feature sets,
``loss(student_logits, teacher_logits, target, class_prior=None, *, student_features,
teacher_features)`` (:class:`gkl.models.features.Features`), and returns its weighted term
(``feat_weight * <formula of gkl.losses.feature>``). Modules with learnable parts (connectors,
regressors, ReviewKD's ABFs) build them in :meth:`FeatureDistiller.setup` from the pair's feature
shapes; :class:`gkl.tasks.DistillationTask` calls it and trains them with the student through the
same optimiser. :class:`LossSum` adds terms (e.g. GKL + ReviewKD).
"""

from .base import FeatureDistiller, LossSum, loss_terms
from .crd import CRD, Embed
from .methods import (
    ABF,
    AT,
    KDSVD,
    NST,
    OFD,
    PKT,
    RKD,
    SP,
    VID,
    ConvReg,
    FitNet,
    ReviewKD,
)

# +baseline=<name> (mdistiller's config names) -> the distiller (mdistiller's CIFAR-100 defaults)
BASELINES: dict[str, type[FeatureDistiller]] = {
    "fitnet": FitNet,
    "at": AT,
    "sp": SP,
    "pkt": PKT,
    "rkd": RKD,
    "nst": NST,
    "kdsvd": KDSVD,
    "vid": VID,
    "ofd": OFD,
    "reviewkd": ReviewKD,
    "crd": CRD,
}

__all__ = [
    "BASELINES",
    "ABF",
    "AT",
    "CRD",
    "Embed",
    "KDSVD",
    "NST",
    "OFD",
    "PKT",
    "RKD",
    "SP",
    "VID",
    "ConvReg",
    "FeatureDistiller",
    "FitNet",
    "LossSum",
    "ReviewKD",
    "loss_terms",
]
