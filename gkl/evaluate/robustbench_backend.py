"""Run ``robustbench.eval.benchmark`` (robustbench 1.1, optional), and load RobustBench zoo
models by name.

``benchmark`` imports fra31's ``autoattack`` package. ``autoattack="fra31"`` (eval.py's
``backend=robustbench``) runs it with that real package and refuses to run without it: an
independent cross-check of gkl's runner. ``autoattack="shim"`` (``backend=robustbench_shim``)
serves the import with :mod:`gkl.evaluate.autoattack_compat` (pyautoattack through gkl's runner):
not independent, for machines without fra31's package.

Install both with ``scripts/install_robustbench.sh``. Its ``aa_state_path`` resume is not
exposed: robustbench 1.1 reads the state back with ``EvaluationState.from_disk`` and calls
``.mean()`` on a bool tensor, which torch rejects; use :func:`gkl.evaluate.run_autoattack` with
``state_path`` for resumable evaluations.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from gkl.evaluate import autoattack_compat
from gkl.evaluate.protocol import (
    budget,
    check_eval_mode,
    check_protocol,
    check_sizes,
    model_device,
)

AUTOATTACKS = ("fra31", "shim")


def _import_robustbench(module: str):
    """``robustbench.<module>``. Where fra31's ``autoattack`` is not installed, the import is
    made with the shim in place (robustbench imports ``autoattack`` at module level);
    :func:`robustbench_benchmark` decides which AutoAttack ``benchmark`` then calls."""
    with ExitStack() as stack:
        if not fra31_installed():
            stack.enter_context(autoattack_compat.installed())
        try:
            return importlib.import_module(f"robustbench.{module}")
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"robustbench unavailable ({error}); run scripts/install_robustbench.sh"
            ) from error


def fra31_installed() -> bool:
    """True when ``import autoattack`` finds a package that is not gkl's shim (fra31's
    ``autoattack``, from GitHub: scripts/install_robustbench.sh installs it)."""
    from gkl.evaluate.fra31_backend import import_fra31

    try:
        import_fra31()
    except ModuleNotFoundError:
        return False
    return True


def robustbench_available() -> bool:
    """True when robustbench 1.1 and its dependencies import (an empty namespace does not
    count); its ``autoattack`` import served by the shim where fra31's package is missing."""
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


@contextmanager
def _local_test_set(dataset: str, x: Tensor, y: Tensor) -> Iterator[None]:
    """Serve ``(x, y)`` as RobustBench's clean test set of ``dataset``: an entry in its loader
    table ``robustbench.data._clean_dataset_loaders`` (what ``load_clean_dataset`` looks up on
    every call), put back afterwards. RobustBench's own loaders would download the data."""
    data = _import_robustbench("data")
    enums = _import_robustbench("model_zoo.enums")
    key = enums.BenchmarkDataset(dataset)

    def load(n_examples: int | None, data_dir: str, prepr) -> tuple[Tensor, Tensor]:
        return x[:n_examples], y[:n_examples]

    loaders = data._clean_dataset_loaders
    saved = loaders[key]
    loaders[key] = load
    try:
        yield
    finally:
        loaders[key] = saved


@contextmanager
def _attribute(owner: object, name: str, value: object) -> Iterator[None]:
    """Set ``owner.name = value`` while active, put back afterwards."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def robustbench_benchmark(
    model: nn.Module,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    eps: float,
    n_examples: int = 10000,
    x_test: Tensor | None = None,
    y_test: Tensor | None = None,
    batch_size: int = 32,
    seed: int | None = 0,
    device: str | torch.device | None = None,
    data_dir: str = "./data",
    preprocessing: str | None = None,
    autoattack: str = "fra31",
) -> tuple[float, float]:
    """(clean accuracy, AutoAttack-standard accuracy) from ``robustbench.eval.benchmark``.

    ``autoattack="fra31"``: ``benchmark`` runs fra31's own ``AutoAttack`` (a
    ``ModuleNotFoundError`` says how to install it; robustbench seeds it with the time).
    ``autoattack="shim"``: ``benchmark``'s ``AutoAttack`` is :mod:`gkl.evaluate.autoattack_compat`
    (pyautoattack through gkl's runner, the same algorithm), seeded with ``seed``.
    With ``x_test``/``y_test`` (inputs in [0, 1]) the first ``n_examples`` of them are its test
    set; otherwise its own loader reads (or downloads) ``data_dir``. ImageNet needs
    ``preprocessing`` (RobustBench's names: Res256Crop224, BicubicRes256Crop224, Crop288,
    Res224). The model must be in eval mode (checked on the first batch when data is given).
    It runs on ``device`` (default: the model's; robustbench would move the model to the CPU).
    """
    if (x_test is None) != (y_test is None):
        raise ValueError("give both x_test and y_test, or neither")
    if dataset == "imagenet" and preprocessing is None:
        raise ValueError(
            "RobustBench's ImageNet evaluation needs preprocessing= (one of Res256Crop224, "
            "BicubicRes256Crop224, Crop288, Res224)"
        )
    eps = budget(eps)
    if autoattack not in AUTOATTACKS:
        raise ValueError(f"autoattack={autoattack!r}; valid choices: {list(AUTOATTACKS)}")
    if autoattack == "fra31" and not fra31_installed():
        raise ModuleNotFoundError(
            "backend=robustbench runs fra31's own `autoattack` package, which is not installed: "
            "run scripts/install_robustbench.sh (pip install git+https://github.com/fra31/"
            "auto-attack), or use backend=robustbench_shim (robustbench on gkl's pyautoattack "
            "shim: not an independent check)"
        )
    with ExitStack() as stack:
        rb_eval = _import_robustbench("eval")
        if autoattack == "shim":
            stack.enter_context(autoattack_compat.installed(seed=seed))
            stack.enter_context(_attribute(rb_eval, "AutoAttack", autoattack_compat.AutoAttack))
        elif rb_eval.AutoAttack is autoattack_compat.AutoAttack:
            raise RuntimeError(
                "robustbench.eval was imported with gkl's shim as its `autoattack`; restart "
                "Python with fra31's package installed for backend=robustbench"
            )
        if x_test is not None:
            x, y = x_test[:n_examples], y_test[:n_examples]
            check_sizes(len(x), batch_size)
            check_protocol(model, x[:batch_size])
            stack.enter_context(_local_test_set(dataset, x, y))
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
            eps=eps,
            preprocessing=preprocessing,
        )
