"""Input checks shared by the losses: clear errors that name the argument and its shape."""

from __future__ import annotations

import torch

from gkl.checks import check_non_negative_number, check_positive_number

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def as_float32_or_wider(x: torch.Tensor) -> torch.Tensor:
    """Upcast fp16/bf16 to float32 so reductions run in float32; float32/float64 pass through."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _sum_is_finite(x: torch.Tensor) -> bool:
    """One pass instead of isfinite's four: a NaN or Inf entry makes the sum non-finite (a
    finite sum proves every entry finite; an overflowing sum sends the caller to the exact
    count)."""
    return bool(torch.isfinite(x.sum(dtype=torch.float32 if x.dtype in _LOW_PRECISION else None)))


def check_logits(name: str, logits: torch.Tensor, *, check_finite: bool) -> None:
    """Require a floating (batch, classes) tensor; optionally require finite entries."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor of logits, got dtype {logits.dtype}; "
            "pass model outputs (e.g. float32), not class indices"
        )
    if logits.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (batch, classes), got shape {tuple(logits.shape)}; "
            "flatten extra dimensions first, e.g. logits.reshape(-1, num_classes)"
        )
    if check_finite and not _sum_is_finite(logits):
        bad = (~torch.isfinite(logits)).sum().item()
        if not bad:  # finite entries whose sum overflowed
            return
        raise ValueError(
            f"{name} has {bad} non-finite entries (NaN or Inf) out of {logits.numel()}; "
            "check the model/learning rate, or pass check_finite=False to skip this check"
        )


def check_pair(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    check_finite: bool,
    names: tuple[str, str] = ("student_logits", "teacher_logits"),
) -> None:
    """Check both logit tensors and that their shapes agree."""
    check_logits(names[0], student_logits, check_finite=check_finite)
    check_logits(names[1], teacher_logits, check_finite=check_finite)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}; "
            "teacher and student must predict the same number of classes"
        )
    if student_logits.numel() == 0:
        raise ValueError(
            f"{names[0]} is empty (shape {tuple(student_logits.shape)}): a batch-mean loss of no "
            "samples or no classes is undefined; skip empty batches (e.g. drop_last=True or "
            "'if len(x) == 0: continue') before calling the loss"
        )


def check_positive(name: str, value: float) -> None:
    """Require a finite ``value > 0`` (a temperature)."""
    check_positive_number(name, value)


def check_non_negative(name: str, value: float) -> None:
    """Require a finite ``value >= 0`` (a loss weight: a negative one turns the loss into a
    gain)."""
    hint = (
        ": a negative weight makes the loss reward the divergence it should reduce; "
        f"use {name}=0 to switch the term off"
    )
    check_non_negative_number(
        name, value, hint=hint if isinstance(value, int | float) and value < 0 else ""
    )


def check_target(target: torch.Tensor, logits: torch.Tensor, *, check_range: bool) -> None:
    """Require integer class indices of shape (batch,); with ``check_range`` within [0, classes).

    The range check reads the labels' min and max (one device synchronisation).
    """
    if not isinstance(target, torch.Tensor) or target.dtype not in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.uint8,
    ):
        got = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be an integer tensor of class indices, got {got}")
    if target.shape != logits.shape[:1]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},) to match logits of shape "
            f"{tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    if check_range and target.numel():
        low, high = torch.stack(torch.aminmax(target)).tolist()
        classes = logits.shape[1]
        if low < 0 or high >= classes:
            raise ValueError(
                f"target holds labels in [{low}, {high}] but the logits have {classes} classes, "
                f"so labels must lie in [0, {classes - 1}]; check the data set's labels and the "
                "model's / loss's num_classes"
            )
