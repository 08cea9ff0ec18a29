"""Typed errors, and the one place where any exception becomes what the user sees.

Every :class:`SlimExportError` carries a one-line message meant for the user; the CLI prints it without a
traceback and exits 2. :func:`user_message` also turns the system's refusals (a read-only directory, a full disk,
a path that is a file where a directory is needed) into such a line, naming the path; whatever it does not
recognise is a bug of slimexport's own (exit 3).
"""

from __future__ import annotations

import errno
import os


class SlimExportError(ValueError):
    """Base class of every error slimexport reports to the user."""


class CheckpointError(SlimExportError):
    """A checkpoint is missing, truncated, corrupt, or of another architecture."""


class DataError(SlimExportError):
    """A data set is missing or malformed."""


class ConfigError(SlimExportError):
    """An option or argument is out of range or inconsistent."""


class OutputExistsError(SlimExportError):
    """An output would overwrite an existing file or run directory without --force."""


class OutputError(SlimExportError):
    """The system refused a write: permission, a read-only or full disk, a path that is a file or a directory."""


class LockedError(SlimExportError):
    """Another slimexport process is writing the same output."""


class UntrustedCodeError(SlimExportError):
    """A file asks slimexport to import or call code that the user did not name on this command line."""


class ModelCodeError(SlimExportError):
    """The user's model code (a factory, a forward, a custom rule) raised, or returned something unusable."""


class DeviceError(SlimExportError):
    """The requested device or execution provider is not available."""


class ParityError(SlimExportError):
    """The exported ONNX model disagrees with PyTorch beyond tolerance."""


class ModelFileError(SlimExportError):
    """A model file (ONNX, ORT) is missing, not a model, truncated, or does not fit the data."""


# errno values that mean "the system said no", not "slimexport has a bug".
SYSTEM_REFUSALS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "already exists",
    errno.ENAMETOOLONG: "file name too long",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.EIO: "input/output error",
    errno.ELOOP: "too many levels of symbolic links",
}


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type's name if it has none)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def system_refusal(e: BaseException) -> str | None:
    """A one-line message for an :class:`OSError` the system raised (permission, disk full, ...), naming the path;
    None for anything else."""
    if not isinstance(e, OSError) or e.errno not in SYSTEM_REFUSALS:
        return None
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(os.fsdecode(p) for p in paths) if paths else "a file slimexport writes"
    return f"cannot write or read {where}: {SYSTEM_REFUSALS[e.errno]}"


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error that is the user's or the system's (exit 2); None for a bug (exit 3)."""
    if isinstance(e, SlimExportError):
        return str(e)
    return system_refusal(e)
