"""A named table of things (datasets, optimizers, quantizers, models, experiments, norm
conversions, commands): one way to register, list and look up, and one error for a name that
is not there.

`Registry` is a read-only Mapping (``name in reg``, ``reg[name]``, ``list(reg)``), so code that
used a plain dict keeps working; `lookup(name)` is the lookup for user input: an unknown name
is one UserError that says what kind of thing was asked for, suggests a close name and lists
the valid ones. Registering a name twice (for another object) is a programming error (ValueError).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from lightnets.errors import UserError, did_you_mean

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named `kind`s ("dataset", "optimizer", ...); see the module docstring.

    `normalize` maps a user's spelling to a key (e.g. str.lower for case-insensitive names).
    """

    def __init__(self, kind: str, normalize: Callable[[str], str] | None = None) -> None:
        self.kind = kind
        self._normalize = normalize
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register `item` under `name` and return it."""
        if name in self._items and self._items[name] is not item:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object under `name` (default: its __name__)."""

        def decorator(item: T) -> T:
            return self.add(name or item.__name__, item)

        return decorator

    def key(self, name: object, also: str = "") -> str:
        """`name` as a registered key, or a UserError naming the kind and the valid names
        (and `also`, what else the caller accepts, e.g. "a callable, or None")."""
        text = str(name)
        key = self._normalize(text) if self._normalize is not None else text
        if key not in self._items:
            names = self.names()
            other = f", {also}" if also else ""
            raise UserError(
                f"unknown {self.kind} {name!r}{did_you_mean(key, names)}: expected one of "
                f"{', '.join(names)}{other}"
            )
        return key

    def lookup(self, name: object, also: str = "") -> T:
        """The item registered as `name` (after `normalize`); an unknown name is a UserError."""
        return self._items[self.key(name, also)]

    def remove(self, name: str) -> None:
        """Unregister `name` (for tests and plugins that register something temporary)."""
        self._items.pop(name, None)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
