"""Data sets as uint8 tensors in memory, with batching and augmentation done on tensors (CPU or GPU).

Sources, by ``--dataset``:

- ``embedded`` (default): a stratified subset of the real Fashion-MNIST shipped inside the package;
- ``fashion-mnist``: the original idx ``.gz`` files found under ``--data-dir`` (or ``$SLIMEXPORT_DATA``), else
  downloaded through torchvision where the network allows;
- ``cifar10`` / ``cifar100``: ``cifar10.npz`` / ``cifar100.npz`` under the data dir (``fetch_cifar10.py``
  builds the former offline), else torchvision;
- a path to any ``.npz`` of uint8 arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.
"""

from __future__ import annotations

import copy
import gzip
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from slimexport.errors import DataError
from slimexport.stream import eval_loader, is_streamed, steps_per_epoch, train_loader

DATA_ENV = "SLIMEXPORT_DATA"
EMBEDDED = "embedded"
NAMED = ("embedded", "fashion-mnist", "cifar10", "cifar100")
FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


@dataclass
class Dataset:
    """uint8 images (N, C, H, W) and int64 labels, plus the per-channel normalisation of the training set."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    label_names: list[str] = field(default_factory=list)
    augmentation: str = "pad-crop"  # training augmentation: pad-crop (small images) or resized-crop (image folders)
    cache: str = "ram"  # ram: uint8 tensors in memory; off: an image folder decoded as batches are needed
    cache_reason: str = ""

    def __post_init__(self) -> None:
        check_labels(self.y_train, self.y_test)  # on every kind: arrays, named sets, folders in memory or streamed
        x = self.x_train
        if not isinstance(x, torch.Tensor):  # streamed: the statistics of (at most) 256 images spread over the split
            x = x[torch.linspace(0, len(x) - 1, min(256, len(x))).long()]
        self.mean, self.std = _channel_stats(x)
        self._norm: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) → normalised float32, on x's device."""
        key = str(x.device)
        if key not in self._norm:  # cached per device: no host-to-device copy per batch
            self._norm[key] = (
                torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * 255,
                torch.tensor(self.std, device=x.device).view(1, -1, 1, 1) * 255,
            )
        mean, std = self._norm[key]
        return (x.float() - mean) / std

    def to(self, device: str | torch.device) -> Dataset:
        """A new Dataset whose raw tensors (kept uint8, so a whole data set fits on a GPU) are on ``device``; this
        one stays where it is. On the same device it shares the tensors."""
        new = copy.copy(self)
        new._norm = dict(self._norm)
        for k in ("x_train", "y_train", "x_test", "y_test"):
            setattr(new, k, getattr(self, k).to(device))
        return new

    def resized(self, size: int) -> Dataset:
        """A copy whose images are ``size`` × ``size`` (bilinear with antialiasing, once, in chunks)."""
        if self.image_size == (size, size):
            return self
        if not isinstance(self.x_train, torch.Tensor):  # streamed: decoded at the new size from now on
            new = copy.copy(self)
            new.x_train, new.x_test = self.x_train.resized(size), self.x_test.resized(size)
            new._norm = {}
            return new

        def resize(x: torch.Tensor) -> torch.Tensor:
            out = [
                F.interpolate(x[i : i + 512].float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
                for i in range(0, len(x), 512)
            ]  # fmt: skip
            return torch.cat(out)

        return Dataset(self.name, resize(self.x_train), self.y_train, resize(self.x_test), self.y_test,
                       self.num_classes, list(self.label_names), self.augmentation, self.cache,
                       self.cache_reason)  # fmt: skip

    @property
    def streamed(self) -> bool:
        """The images are decoded from their files as batches need them (an image folder with ``cache off``)."""
        return is_streamed(self.x_train)

    def steps_per_epoch(self, batch_size: int, drop_last: bool, world: int = 1) -> int:
        """Batches each rank sees in one epoch of :meth:`train_batches` at the global ``batch_size``."""
        n = len(self.y_train)
        if self.streamed:
            return steps_per_epoch(n, batch_size // world, drop_last, world)
        return n // batch_size if drop_last else math.ceil(n / batch_size)

    def train_batches(
        self,
        batch_size: int,
        epoch: int,
        seed: int,
        generator: torch.Generator,
        aug_generator: torch.Generator | None = None,
        drop_last: bool = False,
        augmented: bool = True,
        rank: int = 0,
        world: int = 1,
        device: torch.device | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Rank ``rank``'s shuffled, augmented uint8 training batches of one epoch at the global ``batch_size``,
        on ``device`` (in memory: the global batch drawn alike on every rank, each taking its share, augmented with
        ``aug_generator``; streamed: a DistributedSampler shard decoded by workers, shuffled by seed and epoch)."""
        share = batch_size // world
        if self.streamed:
            cuda = device is not None and device.type == "cuda"
            for xb, yb in train_loader(self.x_train, self.y_train, share, seed, epoch, drop_last, world, rank,
                                       augment=augmented, pin_memory=cuda):  # fmt: skip
                yield (xb.to(device, non_blocking=cuda), yb.to(device, non_blocking=cuda)) if device else (xb, yb)
            return
        aug_generator = aug_generator or generator
        pad = max(1, self.image_size[0] // 8)
        for xb, yb in batches(self.x_train, self.y_train, batch_size, True, generator, drop_last):
            if augmented:  # drawn for the whole global batch on every rank: the inputs of a single process
                if self.augmentation == "resized-crop":
                    xb = augment_resized_crop(xb, generator=aug_generator)
                else:
                    xb = augment(xb, pad, flip=True, generator=aug_generator)
            if world > 1:
                xb, yb = xb[rank * share : (rank + 1) * share], yb[rank * share : (rank + 1) * share]
            yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)

    def test_batches(
        self,
        batch_size: int,
        images: int | None = None,
        shard: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The test split in order as (normalised float32 images, labels) on ``device`` (default: where the data
        is), ``batch_size`` capped by :meth:`eval_batch`: the first ``images`` only, or every ``shard[1]``-th from
        ``shard[0]`` (a rank's part). The one loop every evaluation reads: PyTorch's and onnxruntime's accuracy,
        export parity, INT8 comparison."""
        batch_size = self.eval_batch(batch_size)
        n = len(self.y_test) if images is None else min(images, len(self.y_test))
        if self.streamed and images is None:  # decoded by DataLoader workers as the batches are needed
            it = eval_loader(self.x_test, self.y_test, batch_size, shard)
        elif shard is not None:
            r, w = shard
            it = batches(self.x_test[r::w], self.y_test[r::w], batch_size, shuffle=False)
        else:
            ends = [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
            it = ((self.x_test[i:j], self.y_test[i:j]) for i, j in ends)
        for xb, yb in it:
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            yield self.normalize(xb), yb

    def eval_batch(self, batch: int) -> int:
        """``batch`` for inference, capped so that one batch holds at most 2**23 input values (512 images at
        32×32, 55 at 224×224): a forward's activations grow with the pixels, so large images come in smaller
        batches (a 224-pixel batch of 512 once took a VGG's evaluation to 3 GB)."""
        per_image = self.in_channels * self.image_size[0] * self.image_size[1]
        return max(1, min(batch, (1 << 23) // per_image))

    def summary(self) -> str:
        c, (h, w) = self.in_channels, self.image_size
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_test)} test, {c}×{h}×{w}, {self.num_classes} classes"
        )


def _channel_stats(x: torch.Tensor, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images in [0, 1], summed chunk by chunk in float64: a float
    copy of the whole split would take 4× its bytes (12 GB for 20,000 images at 224×224)."""
    c = x.shape[1]
    total, squares = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk].to(torch.float64).div_(255)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    var = ((squares - n * mean.square()) / max(n - 1, 1)).clamp_min(0)
    return mean.tolist(), var.sqrt().clamp_min(1e-3).tolist()


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV, "~/.cache/slimexport/data")).expanduser()


def load_dataset(
    name: str = EMBEDDED,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    cache: str = "auto",
) -> Dataset:
    """Load a data set by name, ``imagefolder:PATH`` or ``.npz`` path, at ``image_size`` × ``image_size`` when given
    (resized once, in memory); an image folder is kept in memory or streamed as ``cache`` (auto|ram|off) says.
    Raises :class:`DataError` with a one-line reason."""
    if image_size is not None and image_size < 8:
        raise DataError(f"--image-size must be at least 8, got {image_size}")
    ds = _load(name, data_dir, image_size, cache)
    return ds.resized(image_size) if image_size else ds


def _load(name: str, data_dir: str | os.PathLike | None, image_size: int | None, cache: str = "auto") -> Dataset:
    if name.startswith("imagefolder:"):
        return load_imagefolder(Path(name.split(":", 1)[1]).expanduser(), image_size or 224, cache)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if name == EMBEDDED:
        with resources.as_file(resources.files("slimexport.assets") / "fashion_mnist_subset.npz") as p:
            return load_npz(p, name=EMBEDDED)
    if name.endswith(".npz") or Path(name).is_file():
        return load_npz(Path(name).expanduser())
    if name == "fashion-mnist":
        return _load_fashion_mnist(data_dir)
    if name in ("cifar10", "cifar100"):
        npz = data_dir / f"{name}.npz"
        if npz.is_file():
            return load_npz(npz, name=name)
        return _load_torchvision(name, data_dir)
    raise DataError(
        f"unknown data set {name!r}: use one of {', '.join(NAMED)}, imagefolder:PATH or a path to an .npz file"
    )


def load_imagefolder(root: Path, size: int, cache: str = "auto", workers: int | None = None) -> Dataset:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` at ``size`` × ``size``: decoded once into memory, or
    streamed from the files, as ``cache`` (auto|ram|off) says (see :mod:`slimexport.stream`). Training augments
    both with random-resized crops and flips. An image that cannot be read is a one-line :class:`DataError`
    naming the file."""
    from slimexport.console import console
    from slimexport.stream import FolderImages, choose_cache, decode_all, folder_samples

    samples, classes = folder_samples(root)
    choice = choose_cache(cache, sum(len(v) for v in samples.values()), size)
    console.print(f"[dim]image folder {root}: data cache {choice.cache} ({choice.reason})[/]")
    labels = {s: torch.tensor([t for _, t in v], dtype=torch.int64) for s, v in samples.items()}
    if choice.cache == "ram":
        x = {s: decode_all(v, size, workers) for s, v in samples.items()}
    else:
        x = {s: FolderImages(v, size, workers) for s, v in samples.items()}
    return Dataset(f"imagefolder:{root.name}", x["train"], labels["train"], x["val"], labels["val"], len(classes),
                   classes, augmentation="resized-crop", cache=choice.cache, cache_reason=choice.reason)  # fmt: skip


def load_npz(path: Path, name: str | None = None) -> Dataset:
    if not path.is_file():
        raise DataError(f"data set file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise DataError(
                    f"{path} lacks the array(s) {', '.join(missing)} (needs x_train, y_train, x_test, y_test)"
                )
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            labels = [str(s) for s in z["label_names"]] if "label_names" in z.files else []
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read data set {path}: {e}") from None
    return from_arrays(name or path.stem, labels=labels, **arrays)


def _images(x: np.ndarray, what: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise DataError(f"{what} must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:  # (N, H, W) grayscale
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):  # NHWC
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{what} must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    if x.shape[0] == 0 or min(x.shape[2:]) < 8:
        raise DataError(f"{what} has shape {x.shape}: needs at least one image of at least 8×8 pixels")
    return torch.from_numpy(np.ascontiguousarray(x))


def from_arrays(name: str, x_train, y_train, x_test, y_test, labels: list[str] | None = None) -> Dataset:
    xtr, xte = _images(np.asarray(x_train), "x_train"), _images(np.asarray(x_test), "x_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"x_train images are {tuple(xtr.shape[1:])} but x_test images are {tuple(xte.shape[1:])}")
    ys = []
    for what, y, x in (("y_train", y_train, xtr), ("y_test", y_test, xte)):
        y = np.asarray(y).reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{what} must hold integer class labels, got dtype {y.dtype}")
        if len(y) != len(x):
            raise DataError(f"{what} has {len(y)} labels for {len(x)} images")
        if y.min() < 0:
            raise DataError(f"{what} holds negative labels")
        ys.append(torch.from_numpy(y.astype(np.int64)))
    num_classes = int(ys[0].max()) + 1
    return Dataset(name, xtr, ys[0], xte, ys[1], num_classes, list(labels or []))


def check_labels(y_train: torch.Tensor, y_test: torch.Tensor) -> None:
    """Classes 0..K-1, K ≥ 2, every one with training images, and no test label training never saw: a data set
    of one class would train to 100% with loss 0 and prune nothing meaningful, so every kind of data refuses it."""
    train_labels = set(torch.unique(y_train.cpu()).tolist())
    num_classes = max(train_labels, default=0) + 1
    if len(train_labels) < 2:
        raise DataError(f"the data set needs at least two classes; its training images have {len(train_labels)}")
    gaps = sorted(set(range(num_classes)) - train_labels)
    if gaps:
        raise DataError(
            f"y_train labels must be 0..{num_classes - 1} with every class present; no training image has label(s) "
            f"{_few(gaps)}"
        )
    unseen = sorted(set(torch.unique(y_test.cpu()).tolist()) - train_labels)
    if unseen:
        raise DataError(
            f"y_test holds label(s) {_few(unseen)} that no training image has (y_train: 0..{num_classes - 1})"
        )


def _few(values: list[int], n: int = 5) -> str:
    return ", ".join(map(str, values[:n])) + (f" and {len(values) - n} more" if len(values) > n else "")


def _read_idx_gz(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims, big-endian uint32 sizes, then uint8 data), gzipped."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if len(raw) < 8 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {body.size} bytes of data for shape {tuple(dims)}")
    return body.reshape(dims).copy()  # frombuffer is read-only; torch wants writable memory


FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def find_fashion_mnist(data_dir: Path) -> Path | None:
    for d in (data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw"):
        if all((d / f).is_file() for f in FASHION_FILES):
            return d
    return None


def _load_fashion_mnist(data_dir: Path) -> Dataset:
    d = find_fashion_mnist(data_dir)
    if d is None:
        return _load_torchvision("fashion-mnist", data_dir)
    xtr, ytr, xte, yte = (_read_idx_gz(d / f) for f in FASHION_FILES)
    return from_arrays("fashion-mnist", xtr, ytr, xte, yte, FASHION_LABELS)


def _load_torchvision(name: str, data_dir: Path) -> Dataset:
    import torchvision

    cls = {
        "fashion-mnist": torchvision.datasets.FashionMNIST,
        "cifar10": torchvision.datasets.CIFAR10,
        "cifar100": torchvision.datasets.CIFAR100,
    }[name]
    try:
        train = cls(str(data_dir), train=True, download=True)
        test = cls(str(data_dir), train=False, download=True)
    except Exception as e:  # torchvision raises URLError, RuntimeError, OSError... for a failed download
        hint = " (for CIFAR-10 offline: python fetch_cifar10.py DIR, then --data-dir DIR)" if name == "cifar10" else ""
        raise DataError(
            f"{name} not found under {data_dir} and could not be downloaded: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}"
        ) from None
    arrays = [np.asarray(ds.data) for ds in (train, test)]
    labels = [np.asarray(ds.targets) for ds in (train, test)]
    return from_arrays(name, arrays[0], labels[0], arrays[1], labels[1], list(getattr(train, "classes", [])))


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random pad-and-crop plus horizontal flip on a batch (N, C, H, W), vectorised, on x's device."""
    n, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = xp[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows,
            cols,
        ]
    if flip:
        m = torch.rand(n, device=x.device, generator=generator) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def augment_resized_crop(
    x: torch.Tensor, generator: torch.Generator | None = None, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """The standard random-resized crop and horizontal flip on a batch (N, C, H, W) in memory, vectorised: each
    image gets a crop of a random share of its area (``scale``) and aspect (``ratio``), resampled bilinearly to
    (H, W) by ``roi_align`` (which averages 2×2 samples a pixel). Returns float images in 0..255."""
    from torchvision.ops import roi_align

    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale, generator=generator) * h * w
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    cw = (area * log_r.exp()).sqrt().clamp(1, w)
    ch = (area / log_r.exp()).sqrt().clamp(1, h)
    x0 = torch.rand(n, device=dev, generator=generator) * (w - cw)
    y0 = torch.rand(n, device=dev, generator=generator) * (h - ch)
    boxes = torch.stack([torch.arange(n, device=dev, dtype=torch.float32), x0, y0, x0 + cw, y0 + ch], 1)
    out = roi_align(x.float(), boxes, (h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(n, device=dev, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(y)
    order = torch.randperm(n, generator=generator).to(x.device) if shuffle else torch.arange(n, device=x.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def conform(ds: Dataset, image_size: list[int] | tuple[int, ...] | None, what: str) -> Dataset:
    """``ds`` at the square image size a model was trained or exported at (resized once, and said so)."""
    if not image_size or tuple(image_size) == ds.image_size:
        return ds
    h, w = (int(v) for v in image_size)
    if h != w:
        raise DataError(f"{what} takes {h}×{w} images; the data set's are {ds.image_size[0]}×{ds.image_size[1]}")
    from rich.markup import escape

    from slimexport.console import console

    console.print(f"[dim]{escape(f'resizing {ds.name} to {h}×{w}, the image size of {what}')}[/]")
    return ds.resized(h)
