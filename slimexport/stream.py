"""Image folders at any size: decoded as they are needed, or once into memory where the data fit.

``--dataset imagefolder:PATH`` reads ``PATH/train/<class>/*`` and ``PATH/val/<class>/*``. ``--data-cache``:

- ``ram``: every image is decoded once with the eval transform below and kept as uint8, ``3·S·S`` bytes an
  image (150 KB at 224 pixels): fastest for small data;
- ``off``: images stay files; DataLoader workers decode each batch as it is needed, with the standard train
  transform at the model's size (random-resized crop, horizontal flip) and the standard eval transform (resize to
  S·256/224 on the shorter side, centre crop). Memory is bounded by batch size and workers, not by the data set;
- ``auto`` (default): ``ram`` when the decoded splits take at most a quarter of the memory available now, else
  ``off``; the choice and its reason are reported.

Both paths train with the same augmentation (random-resized crop and flip); in memory it runs on the decoded
tensors. A streamed split is a :class:`FolderImages`, which indexes like a uint8 tensor (``x[i:j]``, ``x[idx]``),
decoding the images it is asked for with the eval transform, so every stage that reads a few images (parity,
calibration, accuracy) works on either path; training and evaluation read it through DataLoaders
(:func:`train_loader`, :func:`eval_loader`). Under torchrun every rank reads its own shard (a
``DistributedSampler``, seeded by the run's seed and the epoch). An image that cannot be read is a one-line
:class:`~slimexport.errors.DataError` naming the file.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimexport.config import CACHES
from slimexport.errors import ConfigError, DataError

RAM_SHARE = 0.25  # auto keeps a split in memory when all splits take at most this share of the available memory


def eval_transform(size: int):
    """Resize (shorter side to size·256/224, the ImageNet convention) and centre crop, as uint8 CHW: the test
    images, and the images kept in memory, of both paths."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.PILToTensor()]
    )


def train_transform(size: int):
    """The standard training transform at the model's size: random-resized crop and horizontal flip, uint8 CHW."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, antialias=True),
            transforms.RandomHorizontalFlip(),
            transforms.PILToTensor(),
        ]
    )


class _Files(torch.utils.data.Dataset):
    """(path, label) pairs through a transform. An item that cannot be read comes back as (its path, the reason),
    plain strings that cross the DataLoader's process boundary intact (an exception raised in a worker arrives as
    "Caught OSError in DataLoader worker process 0" and a traceback), so the main process names the file."""

    def __init__(self, samples: list[tuple[str, int]], transform):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        path, target = self.samples[index]
        try:
            return self.transform(default_loader(path)), target
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError, ...
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            return str(path), f"{type(e).__name__}: {text}"


def _collate(items):
    """Collate a batch, or pass on the first unreadable image's (path, reason)."""
    from torch.utils.data import default_collate

    bad = next((item for item in items if isinstance(item[0], str)), None)
    return bad if bad is not None else default_collate(items)


def _checked(batches):
    """Collated batches (x, labels); an unreadable image's (path, reason) is a one-line DataError naming it."""
    for x, y in batches:
        if isinstance(x, str):
            raise DataError(f"cannot read image {x}: {y}")
        yield x, y


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class FolderImages:
    """The images of one split of an image folder, at ``size`` × ``size``, as a uint8 (N, 3, S, S) tensor would
    be indexed: ``x[i:j]``, ``x[idx]`` decode those images (eval transform, in threads); nothing else is kept."""

    def __init__(self, samples: list[tuple[str, int]], size: int, workers: int | None = None):
        self.samples, self.size = list(samples), int(size)
        self.workers = workers or default_workers()
        self.device = torch.device("cpu")
        self.dtype = torch.uint8

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.samples), 3, self.size, self.size))

    def dim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.samples)

    def cpu(self) -> FolderImages:
        return self

    def to(self, *args, **kwargs) -> FolderImages:  # the files stay where they are; batches move
        return self

    def resized(self, size: int) -> FolderImages:
        return FolderImages(self.samples, size, self.workers)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self[[index]][0]
        if isinstance(index, slice):
            idx = range(*index.indices(len(self.samples)))
        else:
            idx = torch.as_tensor(index).reshape(-1).tolist()
        files = _Files([self.samples[i] for i in idx], eval_transform(self.size))
        with ThreadPoolExecutor(self.workers) as pool:
            items = list(pool.map(files.__getitem__, range(len(files))))
        if not items:
            return torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return next(_checked([_collate(items)]))[0]


def is_streamed(x: Any) -> bool:
    return isinstance(x, FolderImages)


@dataclass
class CacheChoice:
    cache: str  # ram or off
    reason: str


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or all of it where that cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_cache(cache: str, n_images: int, size: int) -> CacheChoice:
    """``ram`` or ``off`` for ``cache`` (auto|ram|off), by the decoded size against the memory available."""
    if cache not in CACHES:
        raise ConfigError(f"--data-cache {cache!r}: auto, ram or off")
    need = n_images * 3 * size * size
    gib = 1 << 30
    if cache != "auto":
        return CacheChoice(cache, f"--data-cache {cache} ({need / gib:.2f} GiB decoded)")
    avail = available_memory()
    if need <= RAM_SHARE * avail:
        return CacheChoice("ram", f"auto: {need / gib:.2f} GiB decoded fits in a quarter of {avail / gib:.1f} GiB")
    return CacheChoice("off", f"auto: {need / gib:.2f} GiB decoded exceeds a quarter of {avail / gib:.1f} GiB free")


def decode_all(samples: list[tuple[str, int]], size: int, workers: int | None = None) -> torch.Tensor:
    """Every image of a split decoded once at ``size`` (the in-memory path), by a DataLoader with workers."""
    from torch.utils.data import DataLoader

    n_workers = min(4, default_workers()) if workers is None else workers
    loader = DataLoader(
        _Files(samples, eval_transform(size)), batch_size=64, num_workers=n_workers, collate_fn=_collate
    )
    xs = [x for x, _ in _checked(loader)]
    return torch.cat(xs) if xs else torch.empty(0, 3, size, size, dtype=torch.uint8)


def train_loader(
    images: FolderImages,
    labels: torch.Tensor,
    batch_size: int,
    seed: int,
    epoch: int,
    drop_last: bool,
    world: int = 1,
    rank: int = 0,
    augment: bool = True,
    pin_memory: bool = False,
):
    """This rank's training batches of one epoch, decoded by workers with the train transform: (uint8, labels).
    Shuffled by ``seed`` and ``epoch`` (so a resumed run draws the same order); under torchrun a DistributedSampler
    gives each rank its shard and ``batch_size`` is this rank's share of the global batch."""
    from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

    files = _Files(images.samples, train_transform(images.size) if augment else eval_transform(images.size))
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if world > 1:
        sampler = DistributedSampler(files, world, rank, shuffle=True, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(files, generator=gen)
    loader = DataLoader(files, batch_size=batch_size, sampler=sampler, num_workers=images.workers,
                        collate_fn=_collate, drop_last=drop_last, generator=gen, pin_memory=pin_memory,
                        prefetch_factor=4 if images.workers else None)  # fmt: skip
    return _checked(loader)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool, world: int = 1) -> int:
    """Batches a rank sees in one epoch of :func:`train_loader` (``batch_size``: this rank's share)."""
    per_rank = n // world if drop_last else math.ceil(n / world)
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def eval_loader(images: FolderImages, labels: torch.Tensor, batch_size: int, shard: tuple[int, int] | None = None):
    """The split's batches in order, decoded by workers with the eval transform; ``shard`` (rank, world) keeps every
    world-th image from rank on, as the in-memory evaluation shards."""
    from torch.utils.data import DataLoader, Subset

    files: torch.utils.data.Dataset = _Files(images.samples, eval_transform(images.size))
    if shard is not None:
        files = Subset(files, list(range(shard[0], len(images.samples), shard[1])))
    loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=images.workers, collate_fn=_collate)
    return _checked(loader)


def folder_samples(root: Path) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """(train and val samples, class names) of an image folder; one-line errors for a missing or odd layout."""
    from torchvision import datasets

    if not root.is_dir():
        raise DataError(f"image folder {root} not found")
    found = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root} needs {split}/<class>/<image> folders; {d} is missing")
        try:
            found[split] = datasets.ImageFolder(str(d), loader=lambda p: p)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{d}: {str(e).splitlines()[0][:200]}") from None
    if found["train"].classes != found["val"].classes:
        a, b = set(found["train"].classes), set(found["val"].classes)
        diff = sorted(a ^ b) or ["(same names, other order)"]
        raise DataError(f"{root}: train/ and val/ have different classes ({', '.join(diff[:5])})")
    return {s: list(f.samples) for s, f in found.items()}, list(found["train"].classes)
