"""Read checkpoint files safely and load them strictly, with a readable report on mismatch."""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkl.models.factory import MODEL_REGISTRY

StateDict = Mapping[str, torch.Tensor]

_EXAMPLES = 5


def _extract_state_dict(obj: object) -> dict[str, torch.Tensor]:
    """The state_dict inside ``{"model": sd}`` (mdistiller), ``{"state_dict": sd}`` (Lightning),
    or a bare state_dict."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                return dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        raise ValueError(
            "Unrecognised checkpoint: expected {'model': state_dict}, {'state_dict': ...} or a "
            f"bare state_dict; top-level keys are {list(obj)[:10]}"
        )
    raise ValueError(f"Unrecognised checkpoint: expected a dict, got {type(obj).__name__}")


def _strip(sd: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _common_prefix(keys: list[str]) -> str:
    """Longest dotted prefix (e.g. ``"module."``) shared by all keys."""
    parts = [k.split(".")[:-1] for k in keys]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "".join(f"{p}." for p in common)


def _select(sd: StateDict, expected: StateDict, prefix: str | None) -> dict[str, torch.Tensor]:
    """Strip ``prefix`` (keeping only keys under it), or detect the prefix that holds the model.

    Detection looks for the prefix ``p`` whose keys are exactly the model's (preferring one whose
    shapes match too), e.g. ``"student.model."`` in a Lightning checkpoint; failing that, the
    prefix shared by all keys (e.g. DataParallel's ``"module."``) is stripped so that the mismatch
    report is readable.
    """
    if prefix is not None:
        selected = _strip(sd, prefix)
        if not selected:
            raise ValueError(f"No checkpoint key starts with prefix {prefix!r}")
        return selected
    if not expected or expected.keys() <= sd.keys():
        return dict(sd)
    ref = next(iter(expected))
    candidates = {k[: -len(ref)] for k in sd if k.endswith("." + ref)}
    found = {p: sub for p in candidates if (sub := _strip(sd, p)).keys() == expected.keys()}
    if len(found) > 1:
        found = {
            p: sub
            for p, sub in found.items()
            if all(sub[k].shape == v.shape for k, v in expected.items())
        }
    if len(found) > 1:
        raise ValueError(f"Checkpoint holds several matching models {sorted(found)}; pass prefix")
    if found:
        return next(iter(found.values()))
    return _strip(sd, _common_prefix(list(sd)))


def _classifier_name(model: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` (the classifier head in every model of the zoo)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


@functools.cache
def _layout(name: str) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Parameter shapes and classifier name of a registered model (built on the meta device)."""
    with torch.device("meta"):
        model = MODEL_REGISTRY[name](num_classes=1)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, _classifier_name(model)


def _same_layout(shapes: dict[str, tuple[int, ...]], head: str | None, sd: StateDict) -> bool:
    """Same keys and shapes, ignoring the classifier's output size (its leading dimension)."""
    if shapes.keys() != sd.keys():
        return False
    for key, shape in shapes.items():
        got = tuple(sd[key].shape)
        if head is not None and key.startswith(f"{head}."):
            got, shape = got[1:], shape[1:]
        if got != shape:
            return False
    return True


def guess_architectures(sd: StateDict) -> list[str]:
    """Registered model names whose parameter layout matches ``sd`` (any number of classes)."""
    return [name for name in MODEL_REGISTRY if _same_layout(*_layout(name), sd)]


def _names(guesses: list[str]) -> str:
    return ", ".join(repr(g) for g in guesses) if guesses else "no registered model"


def _looks_like(sd: StateDict, guesses: list[str]) -> str:
    """Matching architectures, or per top-level key group (e.g. a Lightning student/teacher)."""
    if guesses:
        return f"looks like {_names(guesses)}"
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        groups.setdefault(key.split(".")[0], {})[key] = value
    if len(groups) == 1:
        return f"looks like {_names([])}"
    parts = []
    for group in groups.values():
        prefix = _common_prefix(list(group))
        found = guess_architectures(_strip(group, prefix))
        parts.append(f"{prefix!r} ({len(group)} tensors) looks like {_names(found)}")
    return "; ".join(parts)


def _examples(keys: list[str]) -> str:
    more = f", ... (+{len(keys) - _EXAMPLES})" if len(keys) > _EXAMPLES else ""
    return ", ".join(keys[:_EXAMPLES]) + more


def describe_mismatch(model: nn.Module, sd: StateDict, arch_name: str | None = None) -> str | None:
    """A multi-line report of why ``sd`` does not load strictly into ``model`` (None if it does)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return None

    arch = arch_name or type(model).__name__
    lines = [f"Checkpoint does not match the expected architecture {arch!r}:"]
    guesses = guess_architectures(sd)
    head = _classifier_name(model)
    # The checkpoint's classifier: the model's if present, else that of the architecture it matches.
    ckpt_head = head if f"{head}.weight" in sd else (_layout(guesses[0])[1] if guesses else None)
    if head is not None and ckpt_head is not None:
        ckpt_classes = sd[f"{ckpt_head}.weight"].shape[0]
        model_classes = expected[f"{head}.weight"].shape[0]
        if ckpt_classes != model_classes:
            lines.append(f"  checkpoint has {ckpt_classes} classes, model has {model_classes}")
        else:
            lines.append(f"  checkpoint and model both have {model_classes} classes")
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_examples(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_examples(unexpected)}")
    if shapes:
        lines.append(f"  shape mismatches ({len(shapes)}): {_examples(shapes)}")
    lines.append(f"  checkpoint: {len(sd)} tensors; {_looks_like(sd, guesses)}")
    return "\n".join(lines)


def read_checkpoint(path: str | PathLike[str]) -> tuple[Any, str]:
    """``(torch.load(path, weights_only=True), sha256 of the file)``, reading the file once.

    A missing, empty, truncated or foreign file raises ``FileNotFoundError`` / ``ValueError``
    naming the file (instead of torch's ``EOFError`` or ``pop from empty list``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check ckpt_path)")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): re-copy it or pick another file")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises anything from EOFError to KeyError on bad bytes
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"cannot read checkpoint {path} ({len(data)} bytes; {type(error).__name__}: "
            f"{first[:200]}): the file is truncated, corrupt, not written by torch.save, or holds "
            "objects other than tensors and plain containers (only weights_only=True loading is "
            "allowed). Re-copy it or point to another file."
        ) from None
    return obj, hashlib.sha256(data).hexdigest()


def load_state_dict_strict(
    model: nn.Module,
    state: Mapping[str, Any],
    arch_name: str | None = None,
    prefix: str | None = None,
    source: str = "checkpoint",
) -> nn.Module:
    """Load ``state`` (an mdistiller ``{"model": sd}``, a Lightning ``{"state_dict": sd}`` or a
    bare state_dict) into ``model`` with ``strict=True`` and return ``model``.

    ``prefix`` (e.g. ``"student.model."``) selects and strips a sub-model; without it the prefix
    is detected. ``arch_name`` names the expected architecture and ``source`` the file in the
    ``ValueError`` that describes any key/shape/class mismatch.
    """
    try:
        sd = _select(_extract_state_dict(state), model.state_dict(), prefix)
    except ValueError as error:
        raise ValueError(f"{error} (file: {source})") from None
    report = describe_mismatch(model, sd, arch_name)
    if report is not None:
        raise ValueError(f"{report}\n  (file: {source})")
    check_finite_weights(sd, source)
    model.load_state_dict(sd, strict=True)
    return model


def check_finite_weights(sd: StateDict, source: str = "checkpoint") -> None:
    """Refuse weights holding NaN or Inf (a diverged run), naming the file and the tensor."""
    for key, value in sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{source}: {bad} non-finite value{'s' if bad != 1 else ''} (NaN or Inf) in "
                f"{key} (shape {tuple(value.shape)}): the weights come from a diverged run; "
                "use an earlier checkpoint of that run, or retrain with a lower learning rate"
            )


def load_mdistiller_checkpoint(
    model: nn.Module,
    path: str | PathLike[str],
    arch_name: str | None = None,
    prefix: str | None = None,
) -> nn.Module:
    """Read ``path`` with :func:`read_checkpoint` and load it with
    :func:`load_state_dict_strict` (mdistiller, Lightning or bare state_dict files)."""
    obj, _ = read_checkpoint(path)
    return load_state_dict_strict(model, obj, arch_name, prefix, source=str(path))


# Lightning checkpoints of gkl's tasks: the task attribute that holds each `weights` choice.
TASK_WEIGHTS = {"model": "model", "ema": "ema_model", "average": "averaged_model.model"}


def select_weights(obj: Any, weights: str = "auto", source: str = "checkpoint") -> tuple[Any, str]:
    """The weights to evaluate from a loaded checkpoint and what they are.

    In a Lightning checkpoint of a gkl task, ``weights="auto"`` takes the released weights: the
    epoch-level weight average (``averaged_model``, once started), else the EMA (``ema_model``)
    when the task kept one, else the trained ``model``; ``"average"`` / ``"ema"`` require them,
    ``"model"`` takes the trained weights. Returns ``(state_dict, "average" | "ema" | "model")``.
    Any other file (``{"model": sd}``, a bare state_dict) is returned as is with ``"network"``.
    """
    choices = ("auto", *TASK_WEIGHTS)
    if weights not in choices:
        raise ValueError(f"weights must be one of {list(choices)}, got {weights!r}")
    state = obj.get("state_dict") if isinstance(obj, Mapping) else None
    prefixes = {choice: f"{attr}." for choice, attr in TASK_WEIGHTS.items()}
    present = {
        choice
        for choice, prefix in prefixes.items()
        if isinstance(state, Mapping) and any(k.startswith(prefix) for k in state)
    }
    if weights == "ema" and "ema" not in present:
        raise ValueError(
            f"weights=ema but {source} holds no EMA weights ({prefixes['ema']}*): "
            "use weights=auto or weights=model"
        )
    if "model" not in present:
        return obj, "network"
    if weights == "average" and not _average_started(state):
        raise ValueError(
            f"weights=average but {source} holds no started epoch-level weight average "
            "(task.weight_average): use weights=auto or weights=model"
        )
    chosen = weights
    if weights == "auto":
        chosen = "average" if _average_started(state) else "ema" if "ema" in present else "model"
    return _strip(state, prefixes[chosen]), chosen


def _average_started(state: Any) -> bool:
    """Whether a task checkpoint holds an epoch-level weight average with >= 1 epoch folded in."""
    count = state.get("averaged_model.count") if isinstance(state, Mapping) else None
    return count is not None and int(count) > 0
