"""Callbacks: exact resume of random number generators."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn


class RNGStateCallback(pl.Callback):
    """Saves the Python, NumPy, torch CPU and (when CUDA is available) every CUDA device's RNG
    state in checkpoints and restores them on resume.

    Lightning does not checkpoint RNG states; without them a resumed run draws different
    augmentations and attack starts than an uninterrupted one. Stored as tensors and lists so the
    checkpoint loads with ``torch.load(weights_only=True)``.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        return {
            "python": [version, list(internal), gauss],
            "numpy": [
                np_name,
                torch.from_numpy(np_keys.astype(np.int64)),
                np_pos,
                np_has_gauss,
                np_gauss,
            ],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = state_dict["numpy"]
        np.random.set_state(
            (np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss)
        )
        torch.set_rng_state(state_dict["torch"])
        cuda = state_dict.get("cuda") or []
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                rank_zero_warn(
                    f"the checkpoint holds the RNG states of {len(cuda)} CUDA device(s), this "
                    f"process sees {torch.cuda.device_count()}: CUDA random draws (e.g. TRADES "
                    "start noise) will not repeat the interrupted run's"
                )
            for device, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)
