import gzip
import re
import struct

import numpy as np
import pytest
import torch

from slimexport.data import augment, load_dataset
from slimexport.errors import DataError


def test_embedded_subset_is_real_stratified_fashion_mnist():
    ds = load_dataset("embedded")
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [500] * 10
    assert torch.bincount(ds.y_test).tolist() == [200] * 10
    assert ds.label_names[0] == "T-shirt/top"
    assert 0.25 < ds.mean[0] < 0.32  # Fashion-MNIST's well-known mean, 0.286


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.x_train.shape == (20, 3, 16, 16) and ds.num_classes == 4
    assert torch.equal(ds.x_train[3, :, 5, 7], torch.from_numpy(x[3, 5, 7]))


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(x_train=np.zeros((4, 16, 16), np.uint8), y_train=np.zeros(4)), "lacks"),
        (
            dict(
                x_train=np.zeros((4, 16, 16), np.float32),
                y_train=np.arange(4) % 2,
                x_test=np.zeros((2, 16, 16), np.float32),
                y_test=np.arange(2),
            ),
            "uint8",
        ),
        (
            dict(
                x_train=np.zeros((4, 16, 16), np.uint8),
                y_train=np.arange(3),
                x_test=np.zeros((2, 16, 16), np.uint8),
                y_test=np.arange(2),
            ),
            "labels for",
        ),
        (
            dict(
                x_train=np.zeros((4, 16, 16), np.uint8),
                y_train=np.arange(4) % 2,
                x_test=np.zeros((2, 12, 12), np.uint8),
                y_test=np.arange(2),
            ),
            "x_test",
        ),
    ],
)
def test_malformed_npz_is_a_data_error(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def _idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
    for stem, a in (
        ("train-images-idx3-ubyte", x),
        ("train-labels-idx1-ubyte", y),
        ("t10k-images-idx3-ubyte", x[:10]),
        ("t10k-labels-idx1-ubyte", y[:10]),
    ):
        _idx(tmp_path / f"{stem}.gz", a)
    ds = load_dataset("fashion-mnist", tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and torch.equal(
        ds.x_train[4, 0], torch.from_numpy(x[4].astype(np.uint8))
    )
    # a truncated file is named as such
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)


def test_augment_is_a_shifted_crop_with_flips():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.uint8).view(2, 1, 8, 8)
    g = torch.Generator().manual_seed(0)
    y = augment(x, pad=2, flip=True, generator=g)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(augment(x, pad=0, flip=False), x)
    # every output image is one 8×8 window of the zero-padded input, possibly mirrored
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [xp[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(y[i], w) or torch.equal(y[i], w.flip(2)) for w in windows)
    assert not all(torch.equal(y[i], x[i]) for i in range(len(x)))  # something moved (fixed seed)


def _arrays(y_train, y_test):
    import numpy as np

    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.integers(0, 255, (len(y_train), 8, 8), dtype=np.uint8),
        y_train=np.asarray(y_train),
        x_test=rng.integers(0, 255, (len(y_test), 8, 8), dtype=np.uint8),
        y_test=np.asarray(y_test),
    )


@pytest.mark.parametrize(
    "y_train, y_test, match",
    [
        ([0, 1, 3, 3], [0, 1], "no training image has label(s) 2"),
        ([1, 2, 1, 2], [1, 2], "no training image has label(s) 0"),
        ([0, 1, 0, 1], [0, 2], "y_test holds label(s) 2"),
    ],
)
def test_labels_must_be_the_training_classes(y_train, y_test, match):
    from slimexport.data import from_arrays

    with pytest.raises(DataError, match=re.escape(match)):
        from_arrays("t", **_arrays(y_train, y_test))


def test_a_test_split_missing_a_class_is_fine():
    from slimexport.data import from_arrays

    ds = from_arrays("t", **_arrays([0, 1, 2, 0], [0, 1]))
    assert ds.num_classes == 3


def _one_folder(root, classes, size=(20, 20)):
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("cache", ["ram", "off"])
def test_a_folder_of_one_class_is_refused_in_memory_and_streamed(tmp_path, cache):
    """The label checks live with the Dataset, so they hold on every kind (a streamed folder of one class used
    to train to 100% with loss 0)."""
    root = _one_folder(tmp_path / "one", ["only"])
    with pytest.raises(DataError, match="at least two classes"):
        load_dataset(f"imagefolder:{root}", image_size=16, cache=cache)


@pytest.mark.parametrize("cache", ["ram", "off"])
def test_every_kind_of_data_iterates_itself_alike(tmp_path, cache):
    """The interface every loop reads: test batches in order, the first N, or a rank's shard; training batches of
    an epoch at the global batch, each rank its share; steps per epoch as many as the batches."""
    ds = load_dataset(f"imagefolder:{_one_folder(tmp_path / 'f', ['a', 'b', 'c'])}", image_size=16, cache=cache)
    assert ds.streamed == (cache == "off")
    full = list(ds.test_batches(4))
    assert [len(y) for _, y in full] == [4, 4, 1] and all(x.dtype == torch.float32 for x, _ in full)
    xs, ys = torch.cat([x for x, _ in full]), torch.cat([y for _, y in full])
    assert torch.equal(ys, ds.y_test) and torch.allclose(xs, ds.normalize(ds.x_test[:9]))
    first = torch.cat([y for _, y in ds.test_batches(4, images=5)])
    assert torch.equal(first, ds.y_test[:5])
    shards = [torch.cat([y for _, y in ds.test_batches(4, shard=(r, 2))]) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == sorted(ds.y_test.tolist()) and len(shards[0]) == 5
    g = torch.Generator().manual_seed(0)
    epoch = list(ds.train_batches(4, 0, 0, g))
    assert len(epoch) == ds.steps_per_epoch(4, drop_last=False) == 3
    assert sorted(torch.cat([y for _, y in epoch]).tolist()) == sorted(ds.y_train.tolist())
    ranks = [list(ds.train_batches(4, 0, 0, torch.Generator().manual_seed(0), drop_last=True, rank=r, world=2))
             for r in (0, 1)]  # fmt: skip
    assert all(len(y) == 2 for batches in ranks for _, y in batches)
    assert len(ranks[0]) == ds.steps_per_epoch(4, drop_last=True, world=2)
