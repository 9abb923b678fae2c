"""Adversarial attacks on inputs in [0, 1]: PGD (Linf/L2, CE/KL) and TRADES inner maximisation."""

from gkl.attacks.eps import (
    THREAT_NORMS,
    ThreatModel,
    as_k_over_255,
    parse_eps,
    parse_number,
    quiet_eps_warnings,
)
from gkl.attacks.pgd import LOSSES, NORMS, check_unit_range, eval_mode, pgd, trades_perturb

__all__ = [
    "LOSSES",
    "NORMS",
    "THREAT_NORMS",
    "ThreatModel",
    "as_k_over_255",
    "check_unit_range",
    "eval_mode",
    "parse_eps",
    "parse_number",
    "pgd",
    "quiet_eps_warnings",
    "trades_perturb",
]
