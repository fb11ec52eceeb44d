"""Name -> object registries with tags, a duplicate guard and close-match hints in errors."""
from __future__ import annotations

import difflib
import importlib
import unicodedata
from typing import Generic, TypeVar
from collections.abc import Iterable, Iterator

from qrobust.errors import invalid, show

T = TypeVar("T")


def did_you_mean(name, options: Iterable[str], n: int = 1) -> str:
    """``"; did you mean 'x'?"`` for the closest options, or ''. When a hint looks identical to what was
    typed, the message names the odd character (a Cyrillic 'е' for a Latin 'e')."""
    hints = difflib.get_close_matches(str(name), sorted(options), n=n)
    if not hints:
        return ""
    odd = [c for c in str(name) if not c.isascii()]
    extra = ""
    if odd:
        names = ", ".join(f"U+{ord(c):04X} {unicodedata.name(c, '?')}" for c in odd[:3])
        extra = f" (yours has {names})"
    return f"; did you mean {', '.join(map(show, hints))}?{extra}"


class Registry(Generic[T]):
    """A small named collection; ``kind`` is used in error messages ("perturbation", "pair", ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._tags: dict[str, frozenset[str]] = {}

    def register(self, name: str, item: T, tags=()) -> T:
        if not isinstance(name, str) or not name:
            raise invalid("name", name, f"a {self.kind} name must be a non-empty string")
        if name in self._items:
            raise invalid("name", name, f"a {self.kind} with this name is already registered")
        self._items[name] = item
        self._tags[name] = frozenset(tags)
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            hint = did_you_mean(name, self._items, n=3)
            raise invalid(self.kind, name, f"unknown {self.kind}{hint} (known: {', '.join(sorted(self._items))})") from None

    def tags(self, name: str) -> frozenset[str]:
        self.get(name)
        return self._tags[name]

    def names(self, tag: str | None = None) -> list[str]:
        """Registered names in registration order, optionally only those carrying ``tag``."""
        return [n for n in self._items if tag is None or tag in self._tags[n]]

    def __contains__(self, name) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


def import_object(spec: str, key: str):
    """``module:attribute`` -> the attribute; errors name the config key."""
    module_name, _, attr = str(spec).partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any failure while importing user code is one line
        raise invalid(key, spec, f"cannot import ({type(exc).__name__}: {show(str(exc), 160)})") from None
