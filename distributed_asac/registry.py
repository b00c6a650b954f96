"""A name → factory registry for swappable parts (datasets, backbones, attacks, curriculum orders, training modes).

Each registry lives in the module of the parts it names, and none of those modules imports the config or the
training code: `config` imports them to validate names (and list them in --help) without an import cycle.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to callables; adding a part is one decorated function.

    >>> ORDERS = Registry("curriculum order")
    >>> @ORDERS.register("ascending")
    ... def ascending(scores): ...
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """(name, part) in registration order (the comparator rows' table order)."""
        return list(self._items.items())

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(f"unknown {self.kind} {name!r}{suggest(name, self.names())}")
        return self._items[name]


def suggest(name: str, valid: list[str]) -> str:
    """' (did you mean 'x'?; valid: a, b, c)' — the tail of an error message about an unknown name."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" ({hint}valid: {', '.join(valid)})"
