from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from slimexport.data import load_dataset
from slimexport.models import create_model
from tests.helpers import randomize_bns


@pytest.fixture(scope="session")
def small_arrays() -> dict[str, np.ndarray]:
    """A slice of the embedded (real) Fashion-MNIST subset: 600 train and 200 test images, all ten classes."""
    ds = load_dataset("embedded")
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(ds.y_train), generator=g)[:600]
    te = torch.randperm(len(ds.y_test), generator=g)[:200]
    return {
        "x_train": ds.x_train[tr, 0].numpy(),
        "y_train": ds.y_train[tr].numpy().astype(np.uint8),
        "x_test": ds.x_test[te, 0].numpy(),
        "y_test": ds.y_test[te].numpy().astype(np.uint8),
    }


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory, small_arrays) -> str:
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, **small_arrays)
    return str(path)


@pytest.fixture(scope="session")
def small_ds(small_npz):
    return load_dataset(small_npz)


@pytest.fixture
def make_model():
    def make(arch: str, in_channels: int = 1, num_classes: int = 10, seed: int = 0):
        torch.manual_seed(seed)
        m = create_model(arch, num_classes, in_channels)
        randomize_bns(m, seed)
        return m.eval()

    return make


# Training's --precision auto probes bf16 against fp32 on CPUs with native bf16 (AMX): a timing, which could pick
# either on a noisy machine. The suite pins fp32 (subprocesses inherit it); test_workflow tests auto itself.
os.environ.setdefault("SLIMEXPORT_PRECISION", "fp32")


@pytest.fixture(scope="session", autouse=True)
def _latency_cache(tmp_path_factory):
    """--round-to auto measures the runtime's channel block once (a few seconds) and caches it, as the latency
    target caches its timings: the suite keeps both in a directory of its own, not the user's ~/.cache."""
    os.environ["SLIMEXPORT_LATENCY_CACHE"] = str(tmp_path_factory.mktemp("latency-cache"))
