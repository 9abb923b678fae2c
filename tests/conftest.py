"""Shared test set-up: deterministic, 2 threads, float64 helpers."""

import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("HYDRA_FULL_ERROR", "1")


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
