"""Epoch-level weight averaging: the authors' ``swa.py`` (tau 0.9 over the epoch checkpoints).

With ``w_e`` the weights (parameters and buffers) after epoch ``e`` and ``s`` the start epoch,

    a_s = w_s,    a_e = tau * a_{e-1} + (1 - tau) * w_e   (e > s),

integer buffers (``num_batches_tracked``) copied. Computed in the loop instead of from 200 saved
checkpoints; the average and its epoch count are module state, so they travel in Lightning
checkpoints (plain tensors: ``torch.load(weights_only=True)`` loads them) and resume exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .ema import ema_copy, update_ema


class WeightAverage(nn.Module):
    """Holds ``model``: the running average of another network's epoch-end weights."""

    count: torch.Tensor

    def __init__(self, network: nn.Module, tau: float, start_epoch: int = 1) -> None:
        super().__init__()
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"weight_average tau must be in [0, 1) (null: off), got {tau}")
        if start_epoch < 1:
            raise ValueError(f"weight_average_start is a 1-based epoch, got {start_epoch}")
        self.tau = tau
        self.start_epoch = start_epoch
        self.model = ema_copy(network)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, network: nn.Module, epoch: int) -> None:
        """Fold in ``network``'s weights after the 1-based ``epoch`` (no-op before the start)."""
        if epoch < self.start_epoch:
            return
        if int(self.count) == 0:
            self.model.load_state_dict(network.state_dict())
        else:
            update_ema(self.model, network, self.tau)
        self.count += 1

    def extra_repr(self) -> str:
        return f"tau={self.tau}, start_epoch={self.start_epoch}"
