#!/usr/bin/env python3
"""Rebuild slimexport/assets/fashion_mnist_subset.npz: a stratified subset of the real Fashion-MNIST.

Usage: python scripts/build_embedded_data.py [FASHION_MNIST_DIR] [--train-per-class N] [--test-per-class M]
Default source: ../shared/data/fashion-mnist (the original idx .gz files, MIT licence). Deterministic (seed 0).
"""

import argparse
from pathlib import Path

import numpy as np

from slimexport.data import FASHION_LABELS, load_dataset
from slimexport.fileio import atomic_path

OUT = Path(__file__).resolve().parents[1] / "slimexport" / "assets" / "fashion_mnist_subset.npz"


def stratified(y: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.concatenate([rng.choice(np.flatnonzero(y == c), per_class, replace=False) for c in np.unique(y)])
    return np.sort(idx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("src", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared/data/fashion-mnist"))
    ap.add_argument("--train-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=200)
    args = ap.parse_args()
    ds = load_dataset("fashion-mnist", args.src)
    rng = np.random.default_rng(0)
    ytr, yte = ds.y_train.numpy(), ds.y_test.numpy()
    itr, ite = stratified(ytr, args.train_per_class, rng), stratified(yte, args.test_per_class, rng)
    with atomic_path(OUT, suffix=".npz") as tmp:
        np.savez_compressed(
            tmp,
            x_train=ds.x_train.numpy()[itr, 0],
            y_train=ytr[itr].astype(np.uint8),
            x_test=ds.x_test.numpy()[ite, 0],
            y_test=yte[ite].astype(np.uint8),
            label_names=np.array(FASHION_LABELS),
        )
    print(f"wrote {OUT}: {len(itr)} train / {len(ite)} test, {OUT.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
