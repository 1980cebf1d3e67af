"""The backend registry: command-line names to backend classes, imported only when asked for.

It imports neither torch nor any backend, so `moe-ir --help` and `moe-ir backends` stay fast and a
missing optional dependency (onnxruntime, triton, tensorrt) only matters when that backend is asked for,
and then as one clear BackendUnavailable. A name may carry a variant after a colon ("onnx:ort",
"expert_parallel:2"); resolving it is the registry's job, the validation harness receives backend objects.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from moe_ir.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from .base import Backend

# name -> "module:Class" (a module of moe_ir.backends); one line per backend.
_BACKENDS: dict[str, str] = {
    "reference": "reference:ReferenceBackend",
    "torch": "torch_eager:TorchBackend",
    "compile": "compile:CompileBackend",
    "onnx": "onnx:OnnxBackend",
    "aoti": "aoti:AotiBackend",
    "tensorrt": "tensorrt:TensorRTBackend",
    "triton": "triton.backend:TritonBackend",
    "expert_parallel": "expert_parallel.backend:ExpertParallelBackend",
}


def register_backend(name: str, target: str) -> None:
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return list(_BACKENDS)


def _backend_class(name: str) -> type["Backend"]:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(f"moe_ir.backends.{module_name}")
    except ImportError as err:
        raise BackendUnavailable(f"backend '{name}' needs a package that is not installed: {err.name or err} "
                                 f"(install the extra: pip install 'moe-ir[all]')") from None
    return getattr(module, cls_name)


def get_backend(label: str) -> "Backend":
    """The backend a command-line name stands for: "torch", or "name:variant" ("onnx:ort")."""
    name, sep, variant = label.partition(":")
    if sep and not variant:
        raise BackendError(f"backend '{label}': nothing after the colon")
    return _backend_class(name)(variant or None)


def default_backend_labels() -> list[str]:
    """Every registered backend, once per default variant ("onnx:portable", "onnx:ort", ...)."""
    labels: list[str] = []
    for name in _BACKENDS:
        try:
            variants = _backend_class(name).default_variants
        except BackendUnavailable:
            variants = ()
        labels.extend([f"{name}:{v}" for v in variants] if variants else [name])
    return labels


def resolve_backends(labels: list[str]) -> list["Backend"]:
    """Backends for labels; one that cannot be loaded on this machine (a missing package) becomes an
    `Unavailable` placeholder, so a report can say why it did not run instead of failing the whole run."""
    out = []
    for label in labels:
        try:
            out.append(get_backend(label))
        except BackendUnavailable as err:
            from .base import Unavailable

            out.append(Unavailable(label, str(err)))
    return out
