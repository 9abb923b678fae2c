"""One-call robustness report: clean, PGD and AutoAttack accuracy, then one verdict."""

from __future__ import annotations

import logging
import time
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

log = logging.getLogger(__name__)


def verdict(clean: int, pgd: int, autoattack: int, n: int, masking_threshold: float) -> dict:
    """The sanity flags of an evaluation from its counts of correctly classified points (out of
    the same ``n``), each with a ``UserWarning`` and a line in ``warnings``.

    Counts, not fractions: two attacks that leave the same points standing tie exactly (a float64
    PGD fraction and a float32 AutoAttack fraction of the same count need not compare equal).
    ``order_violation``: not ``clean >= PGD >= AutoAttack`` (a stronger attack can only lower
    accuracy; ties are consistent). ``gradient_masking``: ``(PGD - AutoAttack) / n >
    masking_threshold`` (a fraction: 0.10 = 10 points; PGD is fooled by the model's own
    gradients). ``unreliable``: either flag.
    """
    for name, value in (("clean", clean), ("pgd", pgd), ("autoattack", autoattack)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
            raise ValueError(f"verdict takes counts in [0, n={n}]: {name}={value!r}")
    check_masking_threshold(masking_threshold)
    problems = []
    ordered = clean >= pgd >= autoattack
    if not ordered:
        problems.append(
            f"accuracies violate clean >= PGD >= AutoAttack: clean={clean}/{n}, "
            f"PGD={pgd}/{n}, AutoAttack={autoattack}/{n}"
        )
    masking = (pgd - autoattack) / n > masking_threshold
    if masking:
        problems.append(
            f"possible gradient masking: PGD accuracy {pgd}/{n} exceeds AutoAttack "
            f"{autoattack}/{n} by more than masking_threshold={masking_threshold:g}"
        )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=3)
    return {
        "order_violation": not ordered,
        "gradient_masking": masking,
        "unreliable": bool(problems),
        "warnings": problems,
    }


def check_masking_threshold(value: float) -> float:
    """``masking_threshold`` must be a fraction in [0, 1] (0.10 = 10 accuracy points)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(
            f"masking_threshold={value!r} must be a fraction in [0, 1] (0.10 = 10 accuracy "
            "points of PGD above AutoAttack)"
        )
    return float(value)


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
    Accuracies are fractions in [0, 1], ``counts`` the correctly classified points behind them
    (the verdict compares these); ``autoattack_per_attack`` the robust count after each attack in
    order, ``seconds`` the wall time of each stage. Everything runs on the model's device.
    """
    eps = budget(eps)
    if n_examples is not None:
        check_sizes(n_examples, batch_size)
        x, y = x[:n_examples], y[:n_examples]
    check_sizes(len(x), batch_size)
    check_pgd_steps(pgd_steps)
    check_masking_threshold(masking_threshold)
    step_size = default_step_size(eps, pgd_steps) if pgd_step_size is None else pgd_step_size
    step_size = budget(step_size)
    n = len(x)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    check_protocol(model, x[:batch_size])
    clean = count_correct(model, x, y, batch_size)
    seconds["clean"] = time.perf_counter() - start
    log.info("clean: %d/%d correct (%.2f%%), %.1f s", clean, n, 100 * clean / n, seconds["clean"])
    start = time.perf_counter()
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
    )
    seconds["pgd"] = time.perf_counter() - start
    log.info(
        "PGD-%d: %d/%d robust (%.2f%%), %.1f s",
        pgd_steps,
        robust_pgd,
        n,
        100 * robust_pgd / n,
        seconds["pgd"],
    )
    start = time.perf_counter()
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
    seconds["autoattack"] = time.perf_counter() - start
    robust_aa = int(autoattack.robust.sum())
    return {
        "n_examples": n,
        "eps": eps,
        "norm": norm,
        "clean_acc": clean / n,
        "pgd_acc": robust_pgd / n,
        "pgd_steps": pgd_steps,
        "pgd_step_size": step_size,
        "autoattack_acc": robust_aa / n,
        "autoattack_version": autoattack_version,
        "autoattack_resumed": autoattack.resumed,
        "counts": {"n": n, "clean": clean, "pgd": robust_pgd, "autoattack": robust_aa},
        "autoattack_per_attack": autoattack.per_attack,
        "seconds": seconds,
        **verdict(clean, robust_pgd, robust_aa, n, masking_threshold),
    }


def check_pgd_steps(steps: int) -> int:
    """``pgd.steps`` must be a positive integer: zero steps is no attack (the random start only),
    and its accuracy is not a robust accuracy."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"pgd.steps={steps!r} must be an integer >= 1 (20 is the default; 0 steps is no "
            "attack, its accuracy would be reported as PGD accuracy)"
        )
    return steps
