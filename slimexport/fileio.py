"""Atomic writes: every artifact is written to a temporary file in the same directory, then renamed into place.
Outputs are checked before any work (:func:`check_output`) and locked while they are written (:func:`output_lock`),
so two processes never write one run directory or checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from slimexport.errors import SYSTEM_REFUSALS, LockedError, OutputError, OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes files private; artifacts get the usual permissions
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """The directory version of :func:`atomic_path`: yield a scratch directory beside ``path``; what the block
    leaves in ``scratch / "result"`` replaces ``path`` once the block succeeds; on failure nothing changes. The
    scratch directory is always removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield work
        if path.exists():
            shutil.rmtree(path)
        os.replace(work / "result", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output(
    path: str | os.PathLike, force: bool, kind: str = "file", ours: Callable[[Path], bool] | None = None
) -> Path:
    """Refuse, before any work starts, an output that cannot be written or must not be replaced: a path below a
    file; a directory where a file goes (``kind="file"``) or a file where a directory goes (``kind="dir"``); an
    existing output without ``force``; with ``force``, a directory that holds the current directory or that
    ``ours`` does not recognise as slimexport's own output (it would be deleted); a directory the system does not
    let us write (probed by creating and removing a file in the nearest existing directory)."""
    path = Path(path)
    existing = next((p for p in [path.parent, *path.parent.parents] if p.exists() or p.is_symlink()), Path("."))
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a directory")
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputError(f"{path} is a directory; the output is a file: name one inside it")
        if kind == "dir" and not path.is_dir():
            raise OutputError(f"{path} is a file; the output is a directory: name another")
        if not force:
            raise OutputExistsError(f"{path} already exists; pass --force to overwrite it")
        if kind == "dir":
            here, target = Path.cwd().resolve(), path.resolve()
            if target == here or target in here.parents:
                raise OutputError(f"{path} holds the current directory; it would be deleted: name another")
            if ours is not None and any(path.iterdir()) and not ours(path):
                raise OutputError(
                    f"{path} is a directory slimexport did not write; --force replaces only its own outputs: "
                    "name another, or empty it first"
                )
    try:
        fd, probe = tempfile.mkstemp(prefix=".slimexport-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = SYSTEM_REFUSALS.get(e.errno, e.strerror)
        raise OutputError(f"cannot write {path}: {reason} ({existing})") from None
    return path


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold ``.NAME.lock`` beside ``path`` while the block writes ``path``: a second process that wants the same
    output gets a one-line :class:`LockedError` naming the holder's pid. The lock is an advisory ``flock``, which
    the kernel releases when its process dies, so a lock file left by a killed process is stale by construction:
    it is taken over (and said so), never waited on. Under torchrun only rank 0 writes, so only it locks."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    from slimexport.console import console

    path = Path(path)
    lock = _lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise LockedError(
                f"{path} is being written by another slimexport process (pid {holder}, lock {lock}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked while we opened it
            break
        os.close(fd)
    stale = os.read(fd, 64).decode(errors="replace").strip()
    if stale:
        console.print(f"[dim]cleared a stale lock on {path} left by process {stale}, which is gone[/]")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)
