"""Robustness evaluation: protocol checks, clean/PGD/AutoAttack accuracy, RobustBench cards.

``gkl.evaluate.autoattack_compat`` (fra31 ``autoattack`` stand-in) and
``gkl.evaluate.robustbench_backend`` (optional robustbench 1.1) are imported on demand.
"""

from gkl.evaluate.autoattack_runner import (
    AutoAttackResult,
    autoattack_accuracy,
    run_autoattack,
)
from gkl.evaluate.model_card import (
    eps_to_fraction_string,
    model_card,
    percent_string,
    validate_model_card,
    write_model_card,
)
from gkl.evaluate.protocol import (
    check_eval_mode,
    check_protocol,
    clean_accuracy,
    default_step_size,
    model_device,
    pgd_accuracy,
)
from gkl.evaluate.robustness import evaluate

__all__ = [
    "AutoAttackResult",
    "autoattack_accuracy",
    "check_eval_mode",
    "check_protocol",
    "clean_accuracy",
    "default_step_size",
    "eps_to_fraction_string",
    "evaluate",
    "model_card",
    "model_device",
    "percent_string",
    "pgd_accuracy",
    "run_autoattack",
    "validate_model_card",
    "write_model_card",
]
