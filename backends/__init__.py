"""Backends: one sub-package or module per target, looked up by name through the registry in base.py."""
from .base import Backend, BuildResult, Runner, backend_names, get_backend, register_backend

__all__ = ["Backend", "BuildResult", "Runner", "backend_names", "get_backend", "register_backend"]
