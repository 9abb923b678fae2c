"""Adversarial attacks on inputs in [0, 1]: PGD (Linf/L2, CE/KL) and TRADES inner maximisation."""

from gkl.attacks.eps import (
    THREAT_NORMS,
    ThreatModel,
    as_k_over_255,
    check_budget,
    parse_eps,
    parse_number,
)
from gkl.attacks.pgd import LOSSES, NORMS, check_unit_range, eval_mode, pgd, trades_perturb

__all__ = [
    "LOSSES",
    "NORMS",
    "THREAT_NORMS",
    "ThreatModel",
    "as_k_over_255",
    "check_budget",
    "check_unit_range",
    "eval_mode",
    "parse_eps",
    "parse_number",
    "pgd",
    "trades_perturb",
]
