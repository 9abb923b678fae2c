"""Attack defaults shared by training (robust validation) and evaluation."""

from __future__ import annotations


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s rule of thumb: step = 2.5 * eps / steps (reaches the boundary from x)."""
    return 2.5 * eps / max(steps, 1)
