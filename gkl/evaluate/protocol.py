"""Evaluation protocol checks and batched clean / PGD accuracy.

Accuracies are fractions in [0, 1]: acc = (1/n) * sum_i [argmax_k f(x_i)_k == y_i].
Budgets are parsed floats (:class:`gkl.attacks.ThreatModel` parses what a user types).
"""

from __future__ import annotations

from numbers import Real

import torch
from torch import Tensor, nn

from gkl.attacks import check_unit_range, pgd
from gkl.attacks.defaults import default_step_size


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a stateless model)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_eval_mode(model: nn.Module) -> None:
    """Raise ``RuntimeError`` if any module is in training mode."""
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise RuntimeError(
            f"model is in training mode ({len(training)} module(s), e.g. {training[0]!r}); "
            "call model.eval() before evaluating: BatchNorm/Dropout change the outputs"
        )


def check_protocol(model: nn.Module, x: Tensor) -> None:
    """Refuse to evaluate unless every module is in eval mode, ``x`` lies in [0, 1] and the
    logits on ``x`` are all finite (raises ``RuntimeError`` / ``ValueError``)."""
    check_eval_mode(model)
    check_unit_range(x)
    with torch.no_grad():
        logits = model(x.to(model_device(model)))
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise RuntimeError(f"{bad} of {logits.numel()} logits are non-finite (NaN or inf)")


def check_sizes(n_examples: int, batch_size: int) -> None:
    """``n_examples >= 1`` and ``batch_size >= 1``, else a ``ValueError`` naming the argument."""
    for name, value in (("n_examples", n_examples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def budget(eps: float) -> float:
    """``eps`` as a float; strings are refused (parse them once with ``ThreatModel.parse``)."""
    if isinstance(eps, bool) or not isinstance(eps, Real):
        raise TypeError(
            f"eps must be a parsed float, got {eps!r}; parse what the user typed once, e.g. "
            "gkl.attacks.ThreatModel.parse('8/255').eps"
        )
    return float(eps)


def count_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> int:
    """``sum_i [argmax f(x_i) == y_i]`` over batches on the model's device (no checks)."""
    device = model_device(model)
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += int((model(xb.to(device)).argmax(dim=1) == yb.to(device)).sum())
    return correct


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``x`` classified as ``y``, after :func:`check_protocol` on the first batch."""
    check_sizes(len(x), batch_size)
    check_protocol(model, x[:batch_size])
    return count_correct(model, x, y, batch_size) / len(x)


def pgd_correct(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    step_size: float,
    restarts: int,
    loss: str,
    batch_size: int,
    seed: int,
) -> int:
    """Number of points still classified correctly after :func:`gkl.attacks.pgd` (random
    starts from one generator seeded with ``seed``; no checks)."""
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        xb, yb = xb.to(device), yb.to(device)
        x_adv = pgd(
            model,
            xb,
            yb,
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            restarts=restarts,
            loss=loss,
            generator=generator,
        )
        with torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == yb).sum())
    return correct


def pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 1,
    loss: str = "ce",
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Accuracy under :func:`gkl.attacks.pgd` (random start from a generator seeded with
    ``seed``; default step size ``2.5 * eps / steps``), after :func:`check_protocol`."""
    check_sizes(len(x), batch_size)
    check_protocol(model, x[:batch_size])
    eps = budget(eps)
    step = default_step_size(eps, steps) if step_size is None else budget(step_size)
    correct = pgd_correct(
        model,
        x,
        y,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step,
        restarts=restarts,
        loss=loss,
        batch_size=batch_size,
        seed=seed,
    )
    return correct / len(x)
