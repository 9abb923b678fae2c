"""Stand-in for fra31's ``autoattack`` package (GitHub only) on top of pyautoattack.

RobustBench 1.1 does ``from autoattack import AutoAttack`` and
``from autoattack.state import EvaluationState``, then calls
``AutoAttack(model, norm=, eps=, version=, device=, log_path=)`` and
``run_standard_evaluation(x, y, bs=, state_path=)``, expecting ``x_adv`` back. Inside
:func:`installed`, ``import autoattack`` resolves to this module and ``autoattack.state`` to
``pyautoattack.state``; the attacks run through :func:`gkl.evaluate.run_autoattack`, i.e.
pyautoattack (the same algorithm as fra31's package). ``installed(seed=s)`` makes ``s`` the seed
of every ``AutoAttack`` built without one (RobustBench's ``benchmark`` passes none).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyautoattack.state as state
import torch
from torch import Tensor, nn

from gkl.evaluate.autoattack_runner import run_autoattack

__all__ = ["AutoAttack", "installed", "state"]

_default_seed: int | None = None


class AutoAttack:
    """fra31's ``AutoAttack`` constructor and ``run_standard_evaluation`` signature.

    ``verbose`` is accepted and ignored (pyautoattack logs to the ``auto-attack`` logger);
    TensorFlow models and ``log_path`` files are not supported.
    """

    def __init__(
        self,
        model: nn.Module,
        norm: str = "Linf",
        eps: float = 0.3,
        seed: int | None = None,
        verbose: bool = True,
        attacks_to_run: list[str] | tuple[str, ...] = (),
        version: str = "standard",
        is_tf_model: bool = False,
        device: str | torch.device = "cuda",
        log_path: str | None = None,
    ) -> None:
        if is_tf_model or log_path is not None:
            raise NotImplementedError(
                "the pyautoattack shim supports neither TF models nor log_path"
            )
        self.model = model
        self.norm = norm
        self.epsilon = eps
        self.seed = _default_seed if seed is None else seed
        self.verbose = verbose
        self.attacks_to_run = list(attacks_to_run)
        self.version = version
        self.device = device

    def run_standard_evaluation(
        self,
        x_orig: Tensor,
        y_orig: Tensor,
        bs: int = 250,
        return_labels: bool = False,
        state_path: str | Path | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Adversarial inputs (and, with ``return_labels``, the model's labels on them)."""
        result = run_autoattack(
            self.model,
            x_orig,
            y_orig,
            eps=self.epsilon,
            norm=self.norm,
            version=self.version,
            attacks=self.attacks_to_run if self.version == "custom" else None,
            batch_size=bs,
            seed=self.seed,
            state_path=state_path,
            device=self.device,
        )
        if not return_labels:
            return result.x_adv
        with torch.no_grad():
            labels = [self.model(xb.to(self.device)).argmax(dim=1) for xb in result.x_adv.split(bs)]
        return result.x_adv, torch.cat(labels).to(y_orig.device)


@contextmanager
def installed(seed: int | None = None) -> Iterator[None]:
    """Make ``autoattack`` and ``autoattack.state`` importable as this shim while active, with
    ``seed`` as the default seed of the ``AutoAttack`` objects built meanwhile."""
    global _default_seed
    names = {"autoattack": sys.modules[__name__], "autoattack.state": state}
    saved = {name: sys.modules.get(name) for name in names}
    saved_seed, _default_seed = _default_seed, seed
    sys.modules.update(names)
    try:
        yield
    finally:
        _default_seed = saved_seed
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
