"""Name -> entry tables for what moekit extends by registration (STYLE principle 11): model adapters, pruning and
merging methods, cache policies. Registering a taken name is a programming error (ValueError); looking up an unknown
name is the user's (UserError, one line listing what is known)."""

from __future__ import annotations

from typing import TypeVar

from moekit.errors import UserError

T = TypeVar("T")


class Registry(dict):
    def __init__(self, kind: str, unknown: str = "unknown {kind} {name!r}; known: {known}"):
        super().__init__()
        self.kind, self._unknown = kind, unknown

    def register(self, name: str, entry: T) -> T:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self)

    def lookup(self, name: str):
        if name not in self:
            raise UserError(self._unknown.format(kind=self.kind, name=name, known=", ".join(self.names())))
        return self[name]
