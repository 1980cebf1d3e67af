"""A module imported on first attribute access.

The IR's op declarations (signatures, attributes, shape inference) serve `moe-ir inspect` and `graph`,
which need no torch; the reference semantics beside them do. Importing torch takes seconds, so the op
modules name torch through this proxy and pay for the import on the first reference computation.
"""
from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"
