"""Typed errors. Every one carries a one-line message meant for the user; the CLI prints it without a traceback."""


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


class DeviceError(SlimExportError):
    """The requested device or execution provider is not available."""


class ParityError(SlimExportError):
    """The exported ONNX model disagrees with PyTorch beyond tolerance."""


class ModelFileError(SlimExportError):
    """A model file (ONNX, ORT) is missing, not a model, truncated, or does not fit the data."""
