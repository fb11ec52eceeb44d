"""One exception family, so callers can catch everything qrobust raises with one ``except``."""


class QrobustError(Exception):
    """Base class of every error qrobust raises on purpose."""


class InvalidArgument(QrobustError, ValueError):
    """A value passed to qrobust is out of its domain; the message names the parameter and its repr."""


class ConfigError(QrobustError):
    """A configuration file is malformed; the message names the file, the key path and the reason."""


class ModelOutputError(QrobustError):
    """A model produced outputs a gate cannot judge (NaN/Inf, wrong shape, class-count mismatch)."""


class UnsupportedError(QrobustError):
    """The requested operation is not possible for this model kind or platform."""


def invalid(name: str, value, reason: str) -> InvalidArgument:
    """Build the one-line error every bad-argument check uses: ``name=value!r: reason``."""
    return InvalidArgument(f"{name}={value!r}: {reason}")
