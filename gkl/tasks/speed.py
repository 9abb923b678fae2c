"""Speed switches that ``train.run`` applies to a task (``conf/speed/``).

All switches are off by default; mixed precision is Lightning's ``trainer.precision``
(``bf16-mixed``). ``channels_last`` stores the student's and teacher's 4-D weights and their
inputs in NHWC; ``compile`` compiles both forwards in place (``nn.Module.compile``: state_dict
keys, checkpoints and exports are unchanged); ``teacher_inference_mode`` runs the frozen teacher
under ``torch.inference_mode`` instead of ``no_grad``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gkl.models.wrappers import FrozenTeacher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedOptions:
    """The ``speed`` config section; see the module docstring."""

    channels_last: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    teacher_inference_mode: bool = False

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> SpeedOptions:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(section or {}) - set(valid))
        if unknown:
            raise ValueError(f"unknown speed option(s) {unknown}; valid options: {valid}")
        return cls(**dict(section or {}))


class InferenceModeTeacher(FrozenTeacher):
    """A :class:`FrozenTeacher` whose forward runs under ``torch.inference_mode``.

    The logits are cloned outside inference mode: autograd refuses inference tensors in any op
    that saves them for backward (``t * s`` raises; gkl's losses happen to pass, since they only
    save tensors derived from ``t``, e.g. ``d = t - s``), and a (B, C) clone costs nothing next
    to the teacher's forward.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            logits = self.model(x)
        return logits.clone()


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(
        a.contiguous(memory_format=torch.channels_last)
        if isinstance(a, Tensor) and a.ndim == 4
        else a
        for a in args
    )


def use_channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s 4-D weights in NHWC and convert its 4-D inputs before each forward."""
    module.to(memory_format=torch.channels_last)
    module.register_forward_pre_hook(_inputs_channels_last)
    return module


def apply_speed(task: nn.Module, section: Mapping[str, Any] | None) -> SpeedOptions:
    """Apply the ``speed`` options to ``task.model`` and, when present, ``task.teacher``."""
    options = SpeedOptions.from_config(section)
    teacher = getattr(task, "teacher", None)
    if options.teacher_inference_mode:
        if teacher is None:
            log.info("speed.teacher_inference_mode: this task has no teacher; ignored")
        else:
            task.teacher = teacher = InferenceModeTeacher(teacher.model)
    networks = [task.model] + ([teacher.model] if teacher is not None else [])
    if options.channels_last:
        use_channels_last(task.model)
        if teacher is not None:
            use_channels_last(teacher)
    if options.compile:
        for network in networks:
            network.compile(backend=options.compile_backend, mode=options.compile_mode)
    return options
