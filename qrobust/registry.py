"""Name -> object registries with tags, a duplicate guard and close-match hints in errors."""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from qrobust.errors import invalid

T = TypeVar("T")


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
            hint = difflib.get_close_matches(str(name), list(self._items), n=3)
            extra = f"; did you mean {', '.join(map(repr, hint))}?" if hint else ""
            raise invalid(self.kind, name, f"unknown {self.kind}{extra} (known: {', '.join(sorted(self._items))})") from None

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
