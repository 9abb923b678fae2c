"""Run ``robustbench.eval.benchmark`` (robustbench 1.1, optional) on pyautoattack, and load
RobustBench zoo models by name.

Install robustbench with ``scripts/install_robustbench.sh``. Its ``aa_state_path`` resume is not
exposed: robustbench 1.1 reads the state back with ``EvaluationState.from_disk`` and calls
``.mean()`` on a bool tensor, which torch rejects; use :func:`gkl.evaluate.run_autoattack` with
``state_path`` for resumable evaluations.
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from functools import partial
from unittest import mock

import torch
from torch import Tensor, nn

from gkl.attacks import parse_eps
from gkl.evaluate import autoattack_compat
from gkl.evaluate.protocol import check_eval_mode, check_protocol, model_device


def _import_robustbench(module: str):
    """``robustbench.<module>``, imported with the ``autoattack`` -> pyautoattack shim in place."""
    with autoattack_compat.installed():
        try:
            return importlib.import_module(f"robustbench.{module}")
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"robustbench unavailable ({error}); run scripts/install_robustbench.sh"
            ) from error


def robustbench_available() -> bool:
    """True when robustbench 1.1 and its dependencies import (an empty namespace does not
    count), with the ``autoattack`` -> pyautoattack shim in place as this module uses it."""
    try:
        _import_robustbench("eval")
    except Exception:
        return False
    return True


def load_zoo_model(
    name: str, *, dataset: str = "cifar10", threat_model: str = "Linf", model_dir: str = "models"
) -> nn.Module:
    """RobustBench zoo model ``name`` (e.g. ``Carmon2019Unlabeled``) in eval mode, downloaded
    to ``model_dir`` by ``robustbench.utils.load_model`` on first use (needs the internet).

    Zoo models take [0, 1] inputs and normalise inside, as gkl's models do. An unknown name
    raises a ``ValueError`` listing some valid names.
    """
    utils = _import_robustbench("utils")
    zoo = _import_robustbench("model_zoo").model_dicts
    enums = _import_robustbench("model_zoo.enums")
    try:
        known = zoo[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    except (KeyError, ValueError):
        raise ValueError(
            f"RobustBench has no {dataset!r} / {threat_model!r} leaderboard; datasets: "
            f"{[d.value for d in enums.BenchmarkDataset]}, threat models: "
            f"{[t.value for t in enums.ThreatModel]}"
        ) from None
    if name not in known:
        raise ValueError(
            f"unknown RobustBench model {name!r} for {dataset}/{threat_model}; "
            f"{len(known)} names, e.g. {sorted(known)[:5]} (robustbench.model_zoo)"
        )
    model = utils.load_model(
        model_name=name, model_dir=model_dir, dataset=dataset, threat_model=threat_model
    )
    return model.eval()


def robustbench_benchmark(
    model: nn.Module,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    eps: float | str,
    n_examples: int = 10000,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    data_dir: str = "./data",
) -> tuple[float, float]:
    """(clean accuracy, AutoAttack-standard accuracy) from ``robustbench.eval.benchmark``.

    With ``x_test``/``y_test`` (inputs in [0, 1]) the first ``n_examples`` of them replace
    ``robustbench.eval.load_clean_dataset``, which would otherwise download the test set to
    ``data_dir``. The model must be in eval mode (checked on the first batch when data is given).
    AutoAttack uses ``seed`` (robustbench itself passes none, i.e. a time-based seed) and runs
    on ``device`` (default: the model's; robustbench would move the model to the CPU).
    """
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    with ExitStack() as stack:
        stack.enter_context(autoattack_compat.installed())
        rb_eval = _import_robustbench("eval")
        adversary = partial(autoattack_compat.AutoAttack, seed=seed)
        stack.enter_context(mock.patch.object(rb_eval, "AutoAttack", adversary))
        if x_test is not None:
            x, y = x_test[:n_examples], y_test[:n_examples]
            check_protocol(model, x[:batch_size])
            stack.enter_context(
                mock.patch.object(rb_eval, "load_clean_dataset", lambda *args, **kwargs: (x, y))
            )
        else:
            check_eval_mode(model)
        return rb_eval.benchmark(
            model,
            n_examples=n_examples,
            dataset=dataset,
            threat_model=threat_model,
            data_dir=data_dir,
            device=torch.device(device) if device is not None else model_device(model),
            batch_size=batch_size,
            eps=parse_eps(eps, norm=threat_model),
        )
