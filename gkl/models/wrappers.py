"""Model wrappers: input normalisation (RobustBench contract) and frozen KD teachers."""

from collections.abc import Sequence

import torch
from torch import nn

from gkl.checks import check_number, check_positive_number

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


class Normalized(nn.Module):
    """Maps images in ``[0, 1]`` to logits: ``model((x - mean) / std)``.

    ``mean``/``std`` are non-persistent buffers (they follow ``.to()`` but are not saved), so the
    state_dict is exactly the inner model's under the ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std lengths differ: {len(mean)} vs {len(std)}")
        for value in mean:
            check_number("mean", value)
        for value in std:
            check_positive_number("std", value)
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class FrozenTeacher(nn.Module):
    """A KD teacher that never trains: no parameter gradients, eval mode, forward in no_grad.

    ``train()`` is a no-op (the wrapped model stays in eval mode, e.g. BN uses running stats).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Ignore ``mode``: the teacher always stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
