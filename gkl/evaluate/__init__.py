"""Robustness evaluation: protocol checks, clean/PGD/AutoAttack accuracy, RobustBench cards.

``gkl.evaluate.autoattack_compat`` (a pyautoattack stand-in for fra31's ``autoattack``),
``gkl.evaluate.fra31_backend`` (fra31's own package, optional), ``gkl.evaluate.export``
(RobustBench submission files), ``gkl.evaluate.robustbench_backend`` (optional robustbench 1.1)
and ``gkl.evaluate.curve`` (accuracy against eps for several runs) are imported on demand.
"""

from gkl.evaluate.autoattack_runner import (
    AutoAttackResult,
    autoattack_accuracy,
    model_fingerprint,
    run_autoattack,
)
from gkl.evaluate.model_card import (
    eps_to_fraction_string,
    model_card,
    percent_string,
    robustbench_architecture,
    validate_model_card,
    write_model_card,
)
from gkl.evaluate.protocol import (
    check_eval_mode,
    check_protocol,
    clean_accuracy,
    model_device,
    pgd_accuracy,
)
from gkl.evaluate.robustness import evaluate, verdict

__all__ = [
    "AutoAttackResult",
    "autoattack_accuracy",
    "check_eval_mode",
    "check_protocol",
    "clean_accuracy",
    "eps_to_fraction_string",
    "evaluate",
    "model_card",
    "model_device",
    "model_fingerprint",
    "percent_string",
    "pgd_accuracy",
    "robustbench_architecture",
    "run_autoattack",
    "validate_model_card",
    "verdict",
    "write_model_card",
]
