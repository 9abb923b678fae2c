"""Evaluation protocol checks and batched clean / PGD accuracy.

Accuracies are fractions in [0, 1]: acc = (1/n) * sum_i [argmax_k f(x_i)_k == y_i].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gkl.attacks import check_unit_range, parse_eps, pgd, quiet_eps_warnings


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


def clean_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of ``x`` classified as ``y``, after :func:`check_protocol` on the first batch."""
    check_protocol(model, x[:batch_size])
    device = model_device(model)
    correct = 0
    with torch.no_grad():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += int((model(xb.to(device)).argmax(dim=1) == yb.to(device)).sum())
    return correct / len(x)


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule of thumb: step = 2.5 * eps / steps (reaches the boundary from x)."""
    return 2.5 * eps / max(steps, 1)


def pgd_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | str,
    norm: str = "Linf",
    steps: int = 20,
    step_size: float | str | None = None,
    restarts: int = 1,
    loss: str = "ce",
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Accuracy under :func:`gkl.attacks.pgd` (random start from a generator seeded with
    ``seed``; default step size ``2.5 * eps / steps``), after :func:`check_protocol`."""
    check_protocol(model, x[:batch_size])
    eps = parse_eps(eps, norm=norm)
    step = default_step_size(eps, steps) if step_size is None else step_size
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        xb, yb = xb.to(device), yb.to(device)
        with quiet_eps_warnings():
            x_adv = pgd(
                model,
                xb,
                yb,
                eps=eps,
                step_size=step,
                steps=steps,
                norm=norm,
                restarts=restarts,
                loss=loss,
                generator=generator,
            )
        with torch.no_grad():
            correct += int((model(x_adv).argmax(dim=1) == yb).sum())
    return correct / len(x)
