"""Backends: one sub-package or module per target, looked up by name through the registry (registry.py).

The registry functions import no torch; `Backend`, `BuildResult` and `Runner` (base.py, which does) are
loaded on first use.
"""
from .registry import (backend_names, default_backend_labels, get_backend, register_backend,  # noqa: F401
                       resolve_backends)

__all__ = ["Backend", "BuildResult", "Runner", "backend_names", "default_backend_labels", "get_backend",
           "register_backend", "resolve_backends"]


def __getattr__(name: str):
    if name in ("Backend", "BuildResult", "Runner"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
