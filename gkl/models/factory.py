"""Build bare networks (normalised input -> logits) by name."""

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

from gkl.checks import check_count
from gkl.models.cifar import CIFAR_MODELS
from gkl.models.small import SMALL_MODELS

TIMM_PREFIX = "timm/"  # not a way to choose timm: create_model rejects it with the one way

MODEL_REGISTRY: dict[str, Callable[..., nn.Module]] = {**CIFAR_MODELS, **SMALL_MODELS}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (timm models: ``source="timm"`` in the builders)."""
    return list(MODEL_REGISTRY)


def _suggest(name: str, choices: list[str]) -> str:
    """A " Did you mean: ...?" hint from case-insensitive close matches ("" if none)."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""


def create_timm_model(
    name: str, num_classes: int, pretrained: bool = False, in_chans: int = 3, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with a readable error for unknown names.

    Names containing ``:`` (e.g. ``hf-hub:...``) are passed to timm unchecked.
    """
    import timm  # deferred: importing timm is slow and only needed here

    if ":" not in name and not timm.is_model(name):
        hint = _suggest(name, timm.list_models())
        raise ValueError(f"Unknown timm model {name!r}.{hint} See timm.list_models().")
    return timm.create_model(
        name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def reject_timm_prefix(name: str, group: str) -> None:
    """Raise for ``timm/<name>``: timm models are chosen with ``source: timm`` only."""
    if name.startswith(TIMM_PREFIX):
        bare = name[len(TIMM_PREFIX) :]
        raise ValueError(
            f"{group}.name={name!r}: timm models are chosen with {group}.source=timm and the "
            f"bare timm name, not a {TIMM_PREFIX!r} prefix: {group}.source=timm {group}.name={bare}"
            f" (or the config {group}=timm)"
        )


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Create a network of the zoo (:func:`list_models`) by name.

    ``kwargs`` go to the constructor (e.g. ``in_channels`` for zoo models, ``drop_rate`` for
    WideResNets). timm networks come from :func:`create_timm_model` (``source: timm`` in the
    model and teacher configs). The result expects normalised input; wrap it in
    :class:`gkl.models.wrappers.Normalized` for ``[0, 1]`` images.
    """
    reject_timm_prefix(name, "model")
    check_count("num_classes", num_classes)
    for key in ("in_channels", "image_size"):
        if key in kwargs:
            check_count(key, kwargs[key])
    if name not in MODEL_REGISTRY:
        hint = _suggest(name, list_models())
        raise ValueError(
            f"Unknown model {name!r}.{hint} Valid names: {', '.join(list_models())} "
            "(or source=timm for a timm model)."
        )
    return MODEL_REGISTRY[name](num_classes=num_classes, **kwargs)
