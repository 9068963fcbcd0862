"""Name -> object registries (models, metrics, strategies, losses, datasets).

One registry per concept; an unknown name fails with the list of known names.
"""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from kcd.errors import KcdError

T = TypeVar("T")


class Registry(Generic[T]):
    """A small ordered mapping from names to builders with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None):
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is omitted."""

        def add(o: T) -> T:
            if name in self._items:
                raise KcdError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = o
            return o

        if obj is None:
            return add
        return add(obj)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise KcdError(
                f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}"
            ) from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()
