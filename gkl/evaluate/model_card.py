"""RobustBench model cards (``model_info/<dataset>/<threat_model>/<name>.json``).

Read: every format RobustBench's own L-inf/L2 cards use (``footnote`` absent, ``null`` or text;
``unreliable`` and ``external`` optional; accuracies with 0-2 decimals; ``reported`` may be
empty). Write: RobustBench's style (two decimals, ``WideResNet-34-10`` architecture names,
``footnote`` only when there is one, ``unreliable`` always).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gkl.attacks import ThreatModel
from gkl.io import atomic_write_text

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2")
# Fields every RobustBench L-inf/L2 card has, in the order its cards list them.
CARD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "link": str,
    "name": str,
    "authors": str,
    "additional_data": bool,
    "number_forward_passes": int,
    "dataset": str,
    "venue": str,
    "architecture": str,
    "eps": str,
    "clean_acc": str,
    "reported": (str, type(None)),
    "autoattack_acc": str,
}
OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {
    "external": str,  # robust accuracy under a stronger (external) attack
    "footnote": (str, type(None)),
    "unreliable": bool,
}
_PERCENT = re.compile(r"^\d{1,3}(\.\d{1,2})?$")  # RobustBench writes "62.5", "58", "59.53"
_EPS = re.compile(r"^(\d+/255|\d+(\.\d+)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ARCHITECTURES = [  # gkl zoo name -> RobustBench's spelling
    (re.compile(r"^wrn_(\d+)_(\d+)$"), "WideResNet-{0}-{1}"),
    (re.compile(r"^resnet(\d+)x(\d+)$"), "ResNet-{0}x{1}"),
    (re.compile(r"^resnet(\d+)$"), "ResNet-{0}"),
    (re.compile(r"^preact_?resnet(\d+)$"), "PreActResNet-{0}"),
    (re.compile(r"^vgg(\d+)$"), "VGG-{0}"),
]


def robustbench_architecture(name: str) -> str:
    """RobustBench's name for a gkl architecture: ``wrn_34_10`` -> ``WideResNet-34-10``,
    ``resnet18`` -> ``ResNet-18``; other names are returned unchanged."""
    for pattern, template in _ARCHITECTURES:
        match = pattern.match(name)
        if match:
            return template.format(*match.groups())
    return name


def eps_to_fraction_string(eps: float | ThreatModel, norm: str = "Linf") -> str:
    """RobustBench's eps notation of a parsed budget: ``"k/255"`` for Linf budgets equal to
    k/255 (to 1e-6), otherwise the decimal (``"0.031"``, L2 ``"0.5"``)."""
    threat = eps if isinstance(eps, ThreatModel) else ThreatModel(float(eps), norm)
    return str(threat)


def percent_string(accuracy: float) -> str:
    """Fraction in [0, 1] -> percentage with two decimals: 0.85312 -> ``"85.31"``."""
    if isinstance(accuracy, bool) or not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracies are fractions in [0, 1], got {accuracy!r}")
    return f"{100 * accuracy:.2f}"


def model_card(
    *,
    name: str,
    link: str,
    authors: str,
    architecture: str,
    venue: str,
    dataset: str,
    eps: float | ThreatModel,
    clean_acc: float,
    autoattack_acc: float,
    reported: float | None = None,
    norm: str = "Linf",
    additional_data: bool = False,
    number_forward_passes: int = 1,
    footnote: str | None = None,
    unreliable: bool = False,
    external: float | None = None,
) -> dict[str, Any]:
    """Build and validate a RobustBench card in RobustBench's style.

    Accuracies are fractions in [0, 1] and become two-decimal percentage strings
    (``reported=None``: nothing reported in the paper -> ``""``); ``architecture`` is spelled
    as RobustBench does (:func:`robustbench_architecture`); an empty ``footnote`` is omitted.
    """
    card: dict[str, Any] = {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": number_forward_passes,
        "dataset": dataset,
        "venue": venue,
        "architecture": robustbench_architecture(architecture)
        if isinstance(architecture, str)
        else architecture,
        "eps": eps_to_fraction_string(eps, norm),
        "clean_acc": percent_string(clean_acc),
        "reported": "" if reported is None else percent_string(reported),
        "autoattack_acc": percent_string(autoattack_acc),
    }
    if external is not None:
        card["external"] = percent_string(external)
    if footnote:
        card["footnote"] = footnote
    card["unreliable"] = unreliable
    validate_model_card(card, submission=True)
    return card


def _type_name(expected: type | tuple[type, ...]) -> str:
    types = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def validate_model_card(card: dict[str, Any], *, submission: bool = False) -> None:
    """Raise ``ValueError`` listing every missing, unknown or ill-typed/ill-formatted field.

    Accepts RobustBench's real L-inf/L2 cards as they are in its repository's ``model_info``
    (its ``Standard`` cards have empty ``authors``); ``submission=True`` (what gkl writes) also
    requires non-empty ``link``, ``name``, ``authors``, ``venue`` and ``architecture``.
    """
    problems = [f"missing field {key!r}" for key in CARD_FIELDS if key not in card]
    allowed = CARD_FIELDS | OPTIONAL_FIELDS
    problems += [f"unknown field {key!r}" for key in card if key not in allowed]
    for key, value in card.items():
        expected = allowed.get(key)
        types = expected if isinstance(expected, tuple) else (expected,)
        # bool is a subclass of int: number_forward_passes=True must not pass as an int.
        if expected is not None and type(value) not in types:
            problems.append(f"{key} must be {_type_name(expected)}, got {value!r}")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    required = ("link", "name", "authors", "venue", "architecture") if submission else ("name",)
    for key in required:
        if not card[key].strip():
            problems.append(f"{key} must not be empty")
    if card["number_forward_passes"] < 1:
        problems.append("number_forward_passes must be >= 1")
    if card["dataset"] not in DATASETS:
        problems.append(f"dataset must be one of {DATASETS}, got {card['dataset']!r}")
    if not _EPS.match(card["eps"]):
        problems.append(f"eps must look like '8/255' or '0.5', got {card['eps']!r}")
    for key in ("clean_acc", "autoattack_acc", "reported", "external"):
        value = card.get(key)
        if value is None or (key == "reported" and value == ""):
            continue
        if not _PERCENT.match(value) or float(value) > 100:
            problems.append(f"{key} must be a percentage like '85.31', got {value!r}")
    if not problems and float(card["autoattack_acc"]) > float(card["clean_acc"]):
        problems.append("autoattack_acc exceeds clean_acc")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))


def write_model_card(
    card: dict[str, Any], root: str | Path, dataset: str, threat_model: str, name: str
) -> Path:
    """Validate ``card``; write it to ``root/model_info/<dataset>/<threat_model>/<name>.json``."""
    validate_model_card(card, submission=True)
    if card["dataset"] != dataset:
        raise ValueError(f"card is for dataset {card['dataset']!r}, not {dataset!r}")
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {threat_model!r}")
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must be a plain file name ([A-Za-z0-9_.-])")
    path = Path(root) / "model_info" / dataset / threat_model / f"{name}.json"
    return atomic_write_text(path, json.dumps(card, indent=2) + "\n")
