"""Detection data in Ultralytics' format: an offline data set built from the embedded Fashion-MNIST images
(:func:`make_dataset`), and the check of a user's data yaml (:func:`check_data`) that turns what Ultralytics would
warn about and skip, or fetch from the internet, into a one-line error naming the file.

Ultralytics' layout: a yaml with ``train`` and ``val`` (a folder of images, searched recursively, a ``.txt`` list
of image paths, or a list of either), ``names`` (a list or ``{id: name}``) and optionally ``path`` (their root) and
``nc``; each image ``…/images/…/x.png`` has its boxes in ``…/labels/…/x.txt``, one ``class cx cy w h`` per line,
normalised to [0, 1]. An image without a label file has no objects."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from slimexport.errors import ConfigError, DataError, OutputExistsError
from slimexport.fileio import atomic_dir

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp", ".dng", ".mpo", ".pfm", ".heic")
PREFIX = "ultralytics:"


def is_detector_run(cfg: Any) -> bool:
    """The run is a detector's: ``--arch ultralytics:FILE`` with ``--dataset ultralytics:DATA.yaml`` (one without
    the other is an error)."""
    a, d = str(cfg.arch or "").startswith(PREFIX), str(cfg.dataset).startswith(PREFIX)
    if a != d:
        given, missing = (
            ("--arch", "--dataset ultralytics:DATA.yaml") if a else ("--dataset", "--arch ultralytics:FILE")
        )
        raise ConfigError(f"{given} ultralytics:... trains a detector: it needs {missing} too")
    return a


def _fashion_mnist() -> tuple[np.ndarray, np.ndarray, list[str]]:
    with resources.as_file(resources.files("slimexport.assets") / "fashion_mnist_subset.npz") as p:
        z = np.load(p)
        x = np.concatenate([z["x_train"], z["x_test"]])
        y = np.concatenate([z["y_train"], z["y_test"]])
        return x, y, [str(n) for n in z["label_names"]]


def _canvas(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, size: int, max_objects: int):
    """One image: 1..max_objects Fashion-MNIST items, each scaled to 1/10..1/3 of the canvas, tinted, pasted at a
    random place overlapping no other by more than a fifth (IoU); their tight boxes (pixels above 32) and classes."""
    from PIL import Image

    img = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
    boxes: list[tuple[int, float, float, float, float]] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = int(rng.integers(len(x)))
        side = int(rng.integers(max(size // 10, 8), max(size // 3, 9) + 1))
        patch = np.asarray(Image.fromarray(x[k]).resize((side, side), Image.BILINEAR))
        ys, xs = np.nonzero(patch > 32)
        if len(xs) == 0:
            continue
        for _ in range(20):
            left, top = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            b = (left + xs.min(), top + ys.min(), left + xs.max() + 1, top + ys.max() + 1)
            if all(_iou(b, o[1:]) < 0.2 for o in boxes):
                break
        else:
            continue
        tint = rng.uniform(0.5, 1.0, size=3)
        region = img[top : top + side, left : left + side]
        np.maximum(region, (patch[..., None] * tint).astype(np.uint8), out=region)
        boxes.append((int(y[k]), *b))
    return img, boxes


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_dataset(
    out: str | os.PathLike,
    train: int = 1000,
    val: int = 200,
    image_size: int = 160,
    max_objects: int = 4,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a detection data set in Ultralytics' format to ``out`` (atomically) and return its ``data.yaml``:
    ``train`` and ``val`` images of ``image_size``² with 1..``max_objects`` Fashion-MNIST items each (10 classes,
    the embedded subset's 7,000 images), the same files for the same arguments. An existing ``out`` is replaced
    only with ``force``."""
    from PIL import Image

    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists (pass force=True / --force to replace it)")
    if train < 1 or val < 1 or image_size < 32 or max_objects < 1:
        raise DataError(f"make_dataset: train and val >= 1, image_size >= 32, max_objects >= 1 (got {train}, {val}, "
                        f"{image_size}, {max_objects})")  # fmt: skip
    x, y, names = _fashion_mnist()
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as work:
        tmp = work / "result"
        for split, n in (("train", train), ("val", val)):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
            for i in range(n):
                img, boxes = _canvas(rng, x, y, image_size, max_objects)
                Image.fromarray(img).save(tmp / "images" / split / f"{i:05d}.png")
                s = float(image_size)
                lines = [
                    f"{c} {(x0 + x1) / 2 / s:.6f} {(y0 + y1) / 2 / s:.6f} {(x1 - x0) / s:.6f} {(y1 - y0) / s:.6f}"
                    for c, x0, y0, x1, y1 in boxes
                ]
                (tmp / "labels" / split / f"{i:05d}.txt").write_text("".join(line + "\n" for line in lines))
        names_yaml = "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
        (tmp / "data.yaml").write_text(
            f"# Fashion-MNIST items pasted on {image_size}x{image_size} canvases (slimexport, seed {seed})\n"
            f"train: images/train\nval: images/val\nnc: {len(names)}\nnames:\n{names_yaml}"
        )
    return out / "data.yaml"


def check_data(path: str | os.PathLike) -> dict[str, Any]:
    """Read an Ultralytics data yaml and check what it names: the train and val images exist and open, every label
    file parses (five numbers a line, a class below ``nc``, coordinates in [0, 1]). Returns ``{"nc", "names",
    "train", "val"}`` (image counts per split), or raises a one-line :class:`DataError` naming the culprit."""
    import yaml

    path = Path(str(path).removeprefix(PREFIX)).expanduser()
    if not path.is_file():
        raise DataError(f"data yaml {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"data yaml {path}: not YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise DataError(f"data yaml {path}: expected a mapping with train, val and names")
    missing = [k for k in ("train", "val", "names") if k not in data]
    if missing:
        raise DataError(f"data yaml {path}: missing {', '.join(missing)}")
    names = data["names"]
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DataError(f"data yaml {path}: names must be a list or {{0: name, 1: name, ...}}")
    nc = int(data.get("nc", len(names)))
    if nc != len(names):
        raise DataError(f"data yaml {path}: nc is {nc} but names has {len(names)}")
    root = _root(path, data.get("path"))
    counts = {split: _check_split(path, root, data[split], split, nc) for split in ("train", "val")}
    return {"nc": nc, "names": [str(n) for n in names], **counts}


def images_of(path: str | os.PathLike, split: str) -> list[Path]:
    """The image files of a split of a data yaml that :func:`check_data` accepted."""
    import yaml

    path = Path(str(path).removeprefix(PREFIX)).expanduser()
    data = yaml.safe_load(path.read_text())
    return _images(path, _root(path, data.get("path")), data[split], split)


def _root(path: Path, given: Any) -> Path:
    if not given:
        return path.parent
    p = Path(str(given)).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), path.parent):  # Ultralytics: as given, else under its datasets_dir
        if (base / p).exists():
            return (base / p).resolve()
    raise DataError(f"data yaml {path}: path {given!r} not found (relative to {Path.cwd()} or {path.parent})")


def _images(yaml_path: Path, root: Path, entry: Any, split: str) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for e in entries:
        p = Path(str(e)).expanduser()
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    f = Path(line.strip())
                    files.append(f if f.is_absolute() else (p.parent / f))
        else:
            raise DataError(f"data yaml {yaml_path}: {split} {e!r} not found (looked for {p})")
    if not files:
        raise DataError(f"data yaml {yaml_path}: {split} {entry!r} has no images ({', '.join(IMAGE_SUFFIXES[:4])}…)")
    return files


def _check_split(yaml_path: Path, root: Path, entry: Any, split: str, nc: int) -> int:
    from PIL import Image

    files = _images(yaml_path, root, entry, split)
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - Pillow (and plug-ins) raise many kinds for a bad file
            raise DataError(f"image {f}: cannot be read ({str(e).splitlines()[0][:100] or type(e).__name__})") from None
        label = _label_path(f)
        if label.is_file():
            _check_label(label, nc)
    return len(files)


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    s = str(image)
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    i = s.rfind(sa)
    return Path((s[:i] + sb + s[i + len(sa) :]) if i >= 0 else s).with_suffix(".txt")


def _check_label(label: Path, nc: int) -> None:
    try:
        text = label.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"label file {label}: cannot be read ({type(e).__name__})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != 5:  # boxes only: segments and keypoints are other tasks
            raise DataError(f"label file {label}:{n}: expected 'class cx cy w h', got {line.strip()[:60]!r}")
        c = vals[0]
        if c != int(c) or not 0 <= c < nc:
            raise DataError(f"label file {label}:{n}: class {parts[0]} is not one of 0..{nc - 1}")
        if not all(0.0 <= v <= 1.0 for v in vals[1:]):
            raise DataError(f"label file {label}:{n}: box {' '.join(parts[1:])} is not normalised to [0, 1]")
