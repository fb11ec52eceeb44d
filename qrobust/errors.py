"""One exception family, so callers can catch everything qrobust raises with one ``except``.

Every message is one printable line: values pass through ``show``, which escapes control characters
(a key holding a newline cannot forge a second CI log line), spells out non-ASCII characters (a
Cyrillic ``е`` cannot pass for a Latin ``e``) and elides long values.
"""
from __future__ import annotations

import reprlib

SHOW_LIMIT = 80


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


class QrobustWarning(UserWarning):
    """Something a gate can run with but a user should change (calibrating on the gated split, ...)."""


def _bounded_repr(limit: int) -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit
    return r


def show(value, limit: int = SHOW_LIMIT) -> str:
    """A one-line, printable, bounded repr of ``value`` for messages.

    Built with ``reprlib`` (bounded depth and length), so a YAML alias bomb's billion-element value or a
    megabyte key costs nothing to describe; then made ASCII, so control characters and look-alikes show.
    """
    try:
        text = _bounded_repr(limit).repr(value)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    text = text if text.isascii() and text.isprintable() else ascii(text)[1:-1]
    if len(text) > limit:
        text = f"{text[:limit - 20]}...({len(text)} chars)"
    return text


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one bounded line (its message, else its type), for the line a check fails with."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 20] + f"...({len(text)} chars)"


def invalid(name: str, value, reason: str) -> InvalidArgument:
    """Build the one-line error every bad-argument check uses: ``name=value!r: reason``."""
    return InvalidArgument(f"{name}={show(value)}: {reason}")
