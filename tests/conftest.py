"""Shared test set-up: deterministic, 2 threads, float64 helpers."""

import itertools
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _robustbench_available() -> bool:
    from gkl.evaluate.robustbench_backend import robustbench_available

    return robustbench_available()


# Requirement markers (lightning-hydra-template's RunIf): @pytest.mark.<name> skips a test, with
# the reason, where the requirement is missing.
REQUIREMENTS = {
    "needs_fmnist": (
        lambda: all(
            (FMNIST_DIR / f"{s}-images-idx3-ubyte.gz").is_file() for s in ("train", "t10k")
        ),
        f"real Fashion-MNIST not in {FMNIST_DIR}: sudo apt-get install dataset-fashion-mnist",
    ),
    "needs_robustbench": (
        _robustbench_available,
        "robustbench (with its dependencies) not installed (scripts/install_robustbench.sh)",
    ),
    "needs_cuda": (torch.cuda.is_available, "needs a CUDA GPU"),
}


def pytest_configure(config):
    for name, (_, reason) in REQUIREMENTS.items():
        config.addinivalue_line("markers", f"{name}: skipped where it is missing ({reason})")


def pytest_collection_modifyitems(config, items):
    met = {}
    for item in items:
        for name, (available, reason) in REQUIREMENTS.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in met:
                met[name] = available()
            if not met[name]:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Small models run fastest (and steadiest on busy CI cores) on one thread; a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def compose_cfg():
    """``compose_cfg(root, overrides, output_dir=root / "run")``: conf/train.yaml composed as
    ``python train.py <overrides>`` would, writing under ``root``."""
    from gkl.config import compose_config

    def compose(root, overrides, output_dir=None):
        return compose_config(
            "train.yaml",
            [
                f"paths.root_dir={root}",
                f"paths.output_dir={root / 'run' if output_dir is None else output_dir}",
                "~callbacks.progress_bar",
                *overrides,
            ],
        )

    return compose


@pytest.fixture(scope="module")
def digits():
    """(eval-mode MLP with ~96% test accuracy, 397 test images in [0, 1], labels): a small MLP
    trained for a few seconds on sklearn's 8x8 digits."""
    import torch.nn.functional as F
    from torch import nn

    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        for xb, yb in zip(x[train].split(100), y[train].split(100), strict=True):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    return model, x[test], y[test]


@pytest.fixture
def authors_dkl():
    """The authors' AT dkl_loss with B x C x C tensors (DKLv2/Adv-training-dkl), written out:
    ``authors_dkl(adv, nat, rows, alpha, beta, gamma, temperature=1.0)``."""
    import torch.nn.functional as F

    def dkl(adv, nat, rows, alpha, beta, gamma, temperature=1.0):
        c = nat.shape[1]
        delta_n = nat.view(-1, c, 1) - nat.view(-1, 1, c)
        delta_a = adv.view(-1, c, 1) - adv.view(-1, 1, c)
        w = rows.pow(gamma)
        p_n = w.view(-1, c, 1) @ w.view(-1, 1, c)
        mse = 0.25 * ((delta_n - delta_a).pow(2) * p_n).sum() / p_n.sum()
        sce = -(F.softmax(nat / temperature, 1).detach() * F.log_softmax(adv / temperature, 1))
        return beta * mse + alpha * sce.sum(1).mean()

    return dkl


@pytest.fixture(scope="session")
def awp_weight_diff():
    """Wu et al.'s AWP diff_para: ``awp_weight_diff(model, proxy)`` maps each weight matrix W of
    ``model`` to ||W|| / ||W' - W|| * (W' - W), W' its value in ``proxy``."""

    def weight_diff(model, proxy):
        diff = {}
        proxy_state = proxy.state_dict()
        for key, w in model.state_dict().items():
            if w.ndim > 1 and "weight" in key:
                d = proxy_state[key] - w
                diff[key] = w.norm() / (d.norm() + 1e-20) * d
        return diff

    return weight_diff


@pytest.fixture(scope="session")
def sequence_contexts():
    """``sequence_contexts(vocab, length)``: all ``vocab**length`` sequences (N, T), the context
    id of each prefix y[:t] (N, T), and the number of contexts, for a tabular autoregressive
    policy whose table row ``ctx[n, t]`` holds p(. | y_<t)."""

    def enumerate_sequences(vocab, length):
        seqs = torch.tensor(list(itertools.product(range(vocab), repeat=length)))
        # context id of prefix y[:t]: offset of length-t prefixes + base-vocab number of y[:t]
        offsets = [sum(vocab**i for i in range(t)) for t in range(length)]
        ctx = torch.zeros_like(seqs)
        for t in range(length):
            code = torch.zeros(len(seqs), dtype=torch.long)
            for i in range(t):
                code = code * vocab + seqs[:, i]
            ctx[:, t] = offsets[t] + code
        return seqs, ctx, offsets[-1] + vocab ** (length - 1)

    return enumerate_sequences
