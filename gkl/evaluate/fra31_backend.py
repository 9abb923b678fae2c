"""AutoAttack by fra31's own ``autoattack`` package (Croce & Hein's reference code, GitHub only):
eval.py's ``backend=fra31``, an independent cross-check of gkl's runner (pyautoattack).

Called as RobustBench calls it (``robustbench.eval.benchmark``): ``from autoattack import
AutoAttack``; ``AutoAttack(model, norm=, eps=, version=, device=, log_path=)`` (plus ``seed`` and,
for ``version="custom"``, ``attacks_to_run``); ``x_adv = run_standard_evaluation(x, y, bs=)``;
robust accuracy = the accuracy on ``x_adv``. fra31's log (``log_path``) is read back for the
robust accuracy after each attack. gkl's shim (:mod:`gkl.evaluate.autoattack_compat`) is never
used here: an ``autoattack`` module that is the shim is refused.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from gkl.evaluate.protocol import count_correct, model_device

log = logging.getLogger(__name__)
INSTALL = (
    "install fra31's package: scripts/install_robustbench.sh, or "
    "pip install git+https://github.com/fra31/auto-attack"
)
# fra31's log line after each attack: "robust accuracy after APGD-CE: 31.00% (total time 1.2 s)"
_AFTER = re.compile(r"robust accuracy after (?P<attack>[A-Z0-9-]+): (?P<acc>[\d.]+)%")


def import_fra31() -> ModuleType:
    """fra31's ``autoattack`` module, imported as RobustBench does; ``ModuleNotFoundError`` when
    it is not installed or when the name is taken by gkl's shim."""
    shim = sys.modules.get("gkl.evaluate.autoattack_compat")
    if shim is not None and sys.modules.get("autoattack") is shim:
        raise ModuleNotFoundError(f"`autoattack` is gkl's shim here, not fra31's: {INSTALL}")
    try:
        module = importlib.import_module("autoattack")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"fra31's `autoattack` is not installed: {INSTALL}") from None
    if not hasattr(module, "AutoAttack"):
        raise ModuleNotFoundError(f"{module!r} has no AutoAttack: {INSTALL}")
    return module


def fra31_version(module: ModuleType) -> str:
    """The installed distribution's version and where the module lives (fra31's package has no
    ``__version__``; its setup.py says 0.1 for every commit)."""
    try:
        version = importlib.metadata.version("autoattack")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    where = getattr(module, "__file__", None)
    return f"autoattack {version} ({Path(where).parent if where else module.__name__})"


def fra31_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str,
    version: str,
    attacks: list[str] | None,
    batch_size: int,
    seed: int,
    log_path: str | Path,
) -> dict[str, Any]:
    """fra31's AutoAttack ``version`` (``attacks`` with ``version="custom"``) on ``x`` (inputs in
    [0, 1], already protocol-checked): the robust count, the per-attack breakdown from fra31's
    log (``log_path``; ``skipped`` for attacks fra31 did not run because no point was left),
    the wall time and the package's version."""
    module = import_fra31()
    device = model_device(model)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)  # fra31 appends
    options: dict[str, Any] = {"attacks_to_run": list(attacks)} if version == "custom" else {}
    adversary = module.AutoAttack(
        model,
        norm=norm,
        eps=eps,
        version=version,
        device=device,
        log_path=str(log_path),
        seed=seed,
        **options,
    )
    log.info("fra31 AutoAttack %s: %d points, its own log in %s", version, len(y), log_path)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x_adv = adversary.run_standard_evaluation(x.to(device), y.to(device), bs=batch_size)
    seconds = time.perf_counter() - start
    robust = count_correct(model, x_adv.cpu(), y, batch_size)
    per_attack = [
        {"attack": m["attack"].lower(), "robust_acc": float(m["acc"]) / 100}
        for m in _AFTER.finditer(log_path.read_text() if log_path.is_file() else "")
    ]
    # fra31 stops (and logs nothing more) once no point is left: those attacks leave robust / n.
    plan = [a.lower() for a in getattr(adversary, "attacks_to_run", [])]
    for attack in plan[len(per_attack) :]:
        per_attack.append({"attack": attack, "robust_acc": robust / len(y), "skipped": True})
    for entry in per_attack:
        log.info(
            "fra31 AutoAttack: robust accuracy %.2f%% after %s",
            100 * entry["robust_acc"],
            entry["attack"],
        )
    return {
        "robust": robust,
        "per_attack": per_attack,
        "seconds": seconds,
        "version": fra31_version(module),
    }
