"""RobustBench model cards (``model_info/<dataset>/<threat_model>/<name>.json``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gkl.attacks import as_k_over_255, parse_eps

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2")
CARD_FIELDS: dict[str, type] = {
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
    "reported": str,
    "autoattack_acc": str,
    "footnote": str,
    "unreliable": bool,
}
OPTIONAL_FIELDS: dict[str, type] = {"external": str}  # RobustBench: result of a stronger attack
_PERCENT = re.compile(r"^\d{1,3}\.\d{2}$")
_EPS = re.compile(r"^(\d+/255|\d+(\.\d+)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def eps_to_fraction_string(eps: float | str, norm: str = "Linf") -> str:
    """RobustBench's eps notation: ``"k/255"`` for Linf budgets equal to k/255 (to 1e-6),
    otherwise the decimal (``"0.031"``, L2 ``"0.5"``)."""
    value = parse_eps(eps, norm=norm)
    k = as_k_over_255(value)
    if norm == "Linf" and k is not None:
        return f"{k}/255"
    return f"{value:g}"


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
    eps: float | str,
    clean_acc: float,
    autoattack_acc: float,
    reported: float | None = None,
    norm: str = "Linf",
    additional_data: bool = False,
    number_forward_passes: int = 1,
    footnote: str = "",
    unreliable: bool = False,
) -> dict[str, Any]:
    """Build and validate a RobustBench card; accuracies are fractions in [0, 1] and become
    percentage strings (``reported=None``: no number reported in the paper -> ``""``)."""
    card = {
        "link": link,
        "name": name,
        "authors": authors,
        "additional_data": additional_data,
        "number_forward_passes": number_forward_passes,
        "dataset": dataset,
        "venue": venue,
        "architecture": architecture,
        "eps": eps_to_fraction_string(eps, norm),
        "clean_acc": percent_string(clean_acc),
        "reported": "" if reported is None else percent_string(reported),
        "autoattack_acc": percent_string(autoattack_acc),
        "footnote": footnote,
        "unreliable": unreliable,
    }
    validate_model_card(card)
    return card


def validate_model_card(card: dict[str, Any]) -> None:
    """Raise ``ValueError`` listing every missing, unknown or ill-typed/ill-formatted field."""
    problems = [f"missing field {key!r}" for key in CARD_FIELDS if key not in card]
    allowed = CARD_FIELDS | OPTIONAL_FIELDS
    problems += [f"unknown field {key!r}" for key in card if key not in allowed]
    for key, value in card.items():
        expected = allowed.get(key)
        # bool is a subclass of int: number_forward_passes=True must not pass as an int.
        if expected is not None and (type(value) is not expected):
            problems.append(f"{key} must be {expected.__name__}, got {value!r}")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))
    for key in ("link", "name", "authors", "venue", "architecture"):
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
            problems.append(f"{key} must be a percentage with two decimals like '85.31'")
    if not problems and float(card["autoattack_acc"]) > float(card["clean_acc"]):
        problems.append("autoattack_acc exceeds clean_acc")
    if problems:
        raise ValueError("invalid model card: " + "; ".join(problems))


def write_model_card(
    card: dict[str, Any], root: str | Path, dataset: str, threat_model: str, name: str
) -> Path:
    """Validate ``card``; write it to ``root/model_info/<dataset>/<threat_model>/<name>.json``."""
    validate_model_card(card)
    if card["dataset"] != dataset:
        raise ValueError(f"card is for dataset {card['dataset']!r}, not {dataset!r}")
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"threat_model must be one of {THREAT_MODELS}, got {threat_model!r}")
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} must be a plain file name ([A-Za-z0-9_.-])")
    path = Path(root) / "model_info" / dataset / threat_model / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path
