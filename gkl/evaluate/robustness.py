"""One-call robustness report: clean, PGD and AutoAttack accuracy with sanity checks."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gkl.attacks import parse_eps, parse_number, quiet_eps_warnings
from gkl.evaluate.autoattack_runner import autoattack_accuracy
from gkl.evaluate.protocol import clean_accuracy, default_step_size, pgd_accuracy


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | str,
    norm: str = "Linf",
    pgd_steps: int = 20,
    pgd_step_size: float | str | None = None,
    pgd_restarts: int = 1,
    autoattack_version: str = "standard",
    attacks: list[str] | None = None,
    batch_size: int = 256,
    n_examples: int | None = None,
    seed: int = 0,
    state_path: str | Path | None = None,
    masking_threshold: float = 0.10,
) -> dict[str, Any]:
    """Evaluate the first ``n_examples`` points (all if ``None``) and sanity-check the result.

    Expected ordering: clean >= PGD >= AutoAttack; a violation sets ``order_violation``. When
    PGD accuracy exceeds AutoAttack accuracy by more than ``masking_threshold`` (a fraction:
    0.10 = 10 points), PGD is being fooled by its own gradients and ``gradient_masking`` is set.
    Each flag also issues a ``UserWarning`` and adds a line to ``warnings``. Accuracies are
    fractions in [0, 1]; ``state_path`` makes the AutoAttack part resumable. Everything runs on
    the model's device.
    """
    eps = parse_eps(eps, norm=norm)
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    if pgd_step_size is None:
        step_size = default_step_size(eps, pgd_steps)
    else:
        step_size = parse_number(pgd_step_size, "pgd_step_size")
    with quiet_eps_warnings():
        clean = clean_accuracy(model, x, y, batch_size)
        robust_pgd = pgd_accuracy(
            model,
            x,
            y,
            eps=eps,
            norm=norm,
            steps=pgd_steps,
            step_size=step_size,
            restarts=pgd_restarts,
            batch_size=batch_size,
            seed=seed,
        )
        robust_aa = autoattack_accuracy(
            model,
            x,
            y,
            eps=eps,
            norm=norm,
            version=autoattack_version,
            attacks=attacks,
            batch_size=batch_size,
            seed=seed,
            state_path=state_path,
        )
    problems = []
    ordered = clean >= robust_pgd >= robust_aa
    if not ordered:
        problems.append(
            f"accuracies violate clean >= PGD >= AutoAttack: clean={clean:.4f}, "
            f"PGD={robust_pgd:.4f}, AutoAttack={robust_aa:.4f}"
        )
    masking = robust_pgd - robust_aa > masking_threshold
    if masking:
        problems.append(
            f"possible gradient masking: PGD accuracy {robust_pgd:.4f} exceeds AutoAttack "
            f"{robust_aa:.4f} by more than {masking_threshold:.2f}"
        )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return {
        "n_examples": len(x),
        "eps": eps,
        "norm": norm,
        "clean_acc": clean,
        "pgd_acc": robust_pgd,
        "pgd_steps": pgd_steps,
        "pgd_step_size": step_size,
        "autoattack_acc": robust_aa,
        "autoattack_version": autoattack_version,
        "order_violation": not ordered,
        "gradient_masking": masking,
        "warnings": problems,
    }
