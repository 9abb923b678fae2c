"""Adversarial weight perturbation (Wu et al., 2020, "Adversarial Weight Perturbation Helps
Robust Generalization"), as in their TRADES-AWP code.

For every weight tensor W with more than one dimension (conv and linear weights),

    v_W = gamma * ||W|| * g_W / (||g_W|| + 1e-20),   g_W = d L_robust / d W,

the layer-wise normalised ascent direction of the same robust loss the model is trained on. The
reference code gets ``g`` from one SGD step of a proxy copy of the model (``proxy - model`` is
``lr * g``, and the normalisation removes ``lr``); here the gradient is taken directly through
``torch.func.functional_call`` with *copies* of the buffers, so the extra forward pass in train
mode leaves the model's BatchNorm statistics untouched, as the proxy does. The training step
runs at ``W + v``; afterwards ``v`` is subtracted again (``restore``), so the optimiser's update
computed at the perturbed weights lands on the unperturbed ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

Forward = Callable[[Tensor], Tensor]
_TINY = 1e-20  # the reference code's EPS


def awp_perturbation(
    model: nn.Module, loss_fn: Callable[[Forward], Tensor], gamma: float
) -> dict[str, Tensor]:
    """``{name: v_W}`` for the weights of ``model`` with ``ndim > 1`` (see the module docstring).

    ``loss_fn(forward)`` computes the robust loss with ``forward(x)`` in place of ``model(x)``;
    ``model`` keeps its current mode (train mode during training) and all its state.
    """
    if gamma <= 0:
        raise ValueError(f"awp gamma must be > 0, got {gamma}")
    params = dict(model.named_parameters())
    weights = {n: p for n, p in params.items() if p.requires_grad and p.ndim > 1}
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def forward(x: Tensor) -> Tensor:
        return functional_call(model, {**params, **buffers}, (x,))

    loss = loss_fn(forward)
    grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
    perturbation = {}
    with torch.no_grad():
        for (name, weight), grad in zip(weights.items(), grads, strict=True):
            if grad is not None:
                perturbation[name] = gamma * weight.norm() / (grad.norm() + _TINY) * grad
    return perturbation


@torch.no_grad()
def add_perturbation(model: nn.Module, perturbation: dict[str, Tensor], sign: float) -> None:
    """``W <- W + sign * v_W`` for every perturbed weight (``sign=1`` apply, ``-1`` restore)."""
    for name, param in model.named_parameters():
        if name in perturbation:
            param.add_(perturbation[name], alpha=sign)
