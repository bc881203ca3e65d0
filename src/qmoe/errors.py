"""User-facing errors. Every message says what is wrong and what to do about it.

The CLI prints ``str(err)`` on one line and exits with code 2; ``--debug`` shows the traceback.
"""


class QMoEError(Exception):
    """Base class for errors caused by user input, files or the environment (not by bugs)."""


class ConfigError(QMoEError):
    """An option or configuration value is invalid."""


class SourceError(QMoEError):
    """A model source (built-in name or directory) cannot be used."""


class DataError(QMoEError):
    """A text / calibration data source cannot be read."""


class FormatError(QMoEError):
    """An encoded matrix or a compressed checkpoint is corrupt, truncated or of an unknown version."""


class QuantizationError(QMoEError):
    """Quantization cannot proceed (for example NaN/Inf in a weight or Hessian)."""


class DeviceMemoryError(QMoEError):
    """A model does not fit the memory of the device it is asked to run on."""


class BackendUnavailable(QMoEError):
    """An optional backend (numba, triton, CUDA) was requested but is not available."""
