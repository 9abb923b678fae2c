"""Export a gkl classifier for a RobustBench submission: weights that load strictly into
RobustBench's architecture, the model card, and the model-zoo entry of the pull request."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gkl.evaluate.model_card import write_model_card
from gkl.io import atomic_torch_save, atomic_write_text
from gkl.models.wrappers import Normalized

_WRN = re.compile(r"^wrn_(\d+)_(\d+)$")
ZOO_ENTRY_FILE = "zoo_entry.py"


def robustbench_network(model: nn.Module) -> nn.Module:
    """The bare network RobustBench's architecture holds: ``model`` itself, or the inside of a
    ``Normalized`` wrapper whose normalisation is the identity. A real mean/std normalisation
    is refused: RobustBench's ``WideResNet`` has none, so the logits would differ."""
    if not isinstance(model, Normalized):
        return model
    identity = bool((model.mean == 0).all() and (model.std == 1).all())
    if not identity:
        raise ValueError(
            "this model normalises its inputs (mean "
            f"{model.mean.flatten().tolist()}, std {model.std.flatten().tolist()}), but "
            "RobustBench's WideResNet has no normalisation layer, so its logits would differ. "
            "Train the model without one (model.normalize=false, as the authors' GKL-AT recipe: "
            "ToTensor() only) to submit it to RobustBench's model zoo"
        )
    return model.model


def robustbench_constructor(architecture: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Keyword arguments of RobustBench's ``WideResNet`` for a gkl architecture (WRNs only),
    e.g. ``{"depth": 34, "widen_factor": 10, "num_classes": 10, "sub_block1": False}``."""
    match = _WRN.match(architecture or "")
    if match is None:
        raise ValueError(
            f"no RobustBench architecture known for {architecture!r}: export supports gkl's "
            "wide ResNets (wrn_<depth>_<width>, robustbench.model_zoo.architectures.wide_resnet"
            ".WideResNet)"
        )
    kwargs: dict[str, Any] = {
        "depth": int(match.group(1)),
        "widen_factor": int(match.group(2)),
        "num_classes": int(state["fc.weight"].shape[0]),
        "sub_block1": any(k.startswith("sub_block1.") for k in state),
    }
    if "fc.bias" not in state:
        kwargs["bias_last"] = False
    return kwargs


def constructor_call(kwargs: dict[str, Any]) -> str:
    """``WideResNet(depth=34, ...)`` as the zoo entry writes it."""
    return f"WideResNet({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def zoo_entry(card_id: str, kwargs: dict[str, Any]) -> str:
    """The snippet for ``robustbench/model_zoo/<dataset>.py`` (one entry of its model list)."""
    return (
        "# robustbench/model_zoo/<dataset>.py, in the list of the threat model's models\n"
        "# (from robustbench.model_zoo.architectures.wide_resnet import WideResNet):\n"
        f"('{card_id}', {{\n"
        f"    'model': lambda: {constructor_call(kwargs)},\n"
        "    'gdrive_id': '<Google Drive id of the uploaded .pt file>',\n"
        "}),\n"
    )


def export_robustbench(
    model: nn.Module,
    *,
    architecture: str,
    card: dict[str, Any],
    card_id: str,
    threat_model: str,
    out_dir: str | Path,
    verify: bool = True,
) -> dict[str, str]:
    """Write ``out_dir/robustbench/``: ``<card_id>.pt`` (``{"state_dict": ...}``, what
    RobustBench's ``load_model`` reads), ``model_info/<dataset>/<threat>/<card_id>.json`` and
    ``zoo_entry.py``. With ``verify`` and robustbench installed, the weights are loaded strictly
    into RobustBench's own ``WideResNet`` and its logits compared with ``model``'s."""
    network = robustbench_network(model)
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    kwargs = robustbench_constructor(architecture, state)
    root = Path(out_dir) / "robustbench"
    weights = atomic_torch_save({"state_dict": state}, root / f"{card_id}.pt")
    card_path = write_model_card(card, root, card["dataset"], threat_model, card_id)
    entry = atomic_write_text(root / ZOO_ENTRY_FILE, zoo_entry(card_id, kwargs))
    if verify:
        verify_robustbench_weights(model, weights, kwargs)
    return {"weights": str(weights), "model_card": str(card_path), "zoo_entry": str(entry)}


def verify_robustbench_weights(model: nn.Module, weights: Path, kwargs: dict[str, Any]) -> bool:
    """Load ``weights`` strictly into RobustBench's ``WideResNet(**kwargs)`` (when robustbench
    imports) and require the same logits as ``model`` on random inputs (float64, to 1e-10);
    False if robustbench is absent."""
    from gkl.evaluate.robustbench_backend import _import_robustbench, robustbench_available

    if not robustbench_available():
        return False
    wide_resnet = _import_robustbench("model_zoo.architectures.wide_resnet")
    reference = wide_resnet.WideResNet(**kwargs)
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    reference.load_state_dict(saved["state_dict"], strict=True)
    # In float64 both compute the same function to round-off (float32 differs by ~1e-7: gkl
    # pools with adaptive_avg_pool2d, RobustBench with avg_pool2d(8)).
    reference = reference.double().eval()
    ours_model = copy.deepcopy(model).cpu().double().eval()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = ours_model(x), reference(x)
    if not torch.allclose(ours, theirs, rtol=0.0, atol=1e-10):
        raise RuntimeError(
            f"{weights} loads into RobustBench's {constructor_call(kwargs)} but its logits differ "
            "from "
            f"gkl's (max |diff| {float((ours - theirs).abs().max()):.3g})"
        )
    return True


RESULT_KEYS = ("model_card", "checkpoint", "checkpoint_sha256", "weights", "architecture")


def read_results(path: str | Path) -> dict[str, Any]:
    """eval.py's ``results.json`` at ``path``, checked for what an export needs (an evaluated
    checkpoint with a model card); every problem is a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} is not JSON ({error}): give the results.json that eval.py wrote"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a {type(record).__name__}, not eval.py's results record")
    missing = [key for key in RESULT_KEYS if key not in record]
    if missing:
        raise ValueError(f"{path} is not eval.py's results.json (no {', '.join(missing)})")
    if not record["model_card"] or not record["checkpoint"]:
        raise ValueError(
            f"{path} has no model card or no checkpoint: run eval.py with card.id=... on the "
            "checkpoint first (a RobustBench zoo model cannot be exported)"
        )
    return record
