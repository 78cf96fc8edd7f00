"""Registries of named components, with "did you mean" errors.

Entries are registered lazily as "module:attribute" strings so that listing them
(`qprobe ls`) never imports a heavy optional dependency. The registries themselves, with every
built-in entry, are in `qprobe.catalog`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from qprobe.errors import UnknownNameError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "package.module:attribute"
    summary: str  # one line for `qprobe ls`


class Registry(Generic[T]):
    """A name -> component mapping for one family (tasks, back-ends, rewards, losses)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: str, summary: str) -> None:
        if name in self._entries and self._entries[name].target != target:
            raise ValueError(f"{self.kind} '{name}' is already registered as {self._entries[name].target}")
        self._entries[name] = Entry(name, target, summary)

    def get(self, name: str) -> T:
        """The registered object (class or function) for `name`, imported on first use."""
        entry = self.entry(name)
        module, _, attr = entry.target.partition(":")
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "run `qprobe ls` to see them"
            raise UnknownNameError(
                f"expected a {self.kind} name among {sorted(self._entries)}, got '{name}'; {hint}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        factory: Callable[..., Any] = self.get(name)  # type: ignore[assignment]
        return factory(*args, **kwargs)

