"""Exponential moving average of a model's weights and buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` to hold its EMA (no gradients, never optimised)."""
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``e <- decay * e + (1 - decay) * w`` for every floating-point parameter and buffer
    (BatchNorm running statistics included); integer buffers (``num_batches_tracked``) are
    copied. ``ema`` and ``model`` must have the same architecture."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    ema_state, state = ema.state_dict(), model.state_dict()
    if ema_state.keys() != state.keys():
        raise ValueError("EMA model and model have different state_dict keys")
    for key, average in ema_state.items():
        value = state[key]
        if average.is_floating_point():
            average.lerp_(value, 1.0 - decay)
        else:
            average.copy_(value)
