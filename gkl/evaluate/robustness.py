"""One-call robustness report: clean, PGD and AutoAttack accuracy, then one verdict."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gkl.attacks.defaults import default_step_size
from gkl.evaluate.autoattack_runner import run_autoattack
from gkl.evaluate.protocol import (
    budget,
    check_protocol,
    check_sizes,
    count_correct,
    pgd_correct,
)


def verdict(clean: float, pgd: float, autoattack: float, masking_threshold: float) -> dict:
    """The sanity flags of an evaluation, each with a ``UserWarning`` and a line in ``warnings``.

    ``order_violation``: not ``clean >= PGD >= AutoAttack`` (a stronger attack can only lower
    accuracy). ``gradient_masking``: ``PGD - AutoAttack > masking_threshold`` (a fraction: 0.10
    = 10 points; PGD is fooled by the model's own gradients). ``unreliable``: either flag.
    """
    problems = []
    ordered = clean >= pgd >= autoattack
    if not ordered:
        problems.append(
            f"accuracies violate clean >= PGD >= AutoAttack: clean={clean:.4f}, "
            f"PGD={pgd:.4f}, AutoAttack={autoattack:.4f}"
        )
    masking = pgd - autoattack > masking_threshold
    if masking:
        problems.append(
            f"possible gradient masking: PGD accuracy {pgd:.4f} exceeds AutoAttack "
            f"{autoattack:.4f} by more than {masking_threshold:.2f}"
        )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=3)
    return {
        "order_violation": not ordered,
        "gradient_masking": masking,
        "unreliable": bool(problems),
        "warnings": problems,
    }


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    pgd_steps: int = 20,
    pgd_step_size: float | None = None,
    pgd_restarts: int = 1,
    autoattack_version: str = "standard",
    attacks: list[str] | None = None,
    batch_size: int = 256,
    n_examples: int | None = None,
    seed: int = 0,
    state_path: str | Path | None = None,
    masking_threshold: float = 0.10,
    tag: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the first ``n_examples`` points (all if ``None``) in one straight line.

    Protocol check (eval mode, inputs in [0, 1], finite logits) once -> clean accuracy -> PGD
    (step ``2.5 * eps / steps`` unless given) -> AutoAttack (resumable with ``state_path``, the
    state bound to this model and ``tag``) -> :func:`verdict`. ``eps`` is a parsed float.
    Accuracies are fractions in [0, 1]; everything runs on the model's device.
    """
    eps = budget(eps)
    if n_examples is not None:
        check_sizes(n_examples, batch_size)
        x, y = x[:n_examples], y[:n_examples]
    check_sizes(len(x), batch_size)
    step_size = default_step_size(eps, pgd_steps) if pgd_step_size is None else pgd_step_size
    step_size = budget(step_size)
    check_protocol(model, x[:batch_size])
    clean = count_correct(model, x, y, batch_size) / len(x)
    robust_pgd = pgd_correct(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=pgd_steps,
        step_size=step_size,
        restarts=pgd_restarts,
        loss="ce",
        batch_size=batch_size,
        seed=seed,
    ) / len(x)
    autoattack = run_autoattack(
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
        device=None,
        tag=tag,
        check=False,  # checked above, once
    )
    return {
        "n_examples": len(x),
        "eps": eps,
        "norm": norm,
        "clean_acc": clean,
        "pgd_acc": robust_pgd,
        "pgd_steps": pgd_steps,
        "pgd_step_size": step_size,
        "autoattack_acc": autoattack.robust_accuracy,
        "autoattack_version": autoattack_version,
        "autoattack_resumed": autoattack.resumed,
        **verdict(clean, robust_pgd, autoattack.robust_accuracy, masking_threshold),
    }
