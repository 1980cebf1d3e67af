"""What every backend provides, and the registry the CLI and the validation harness use.

A backend answers `supports(graph)` with (ok, reason) before anything is lowered, so the CLI can print a
support matrix and a user gets a reason instead of a crash deep inside a compiler. `prepare` lowers the
graph with given weights to something runnable in-process (used by `moe-ir validate`); `build` writes a
deployable artifact into a folder (used by `moe-ir build`), atomically.

Backends are imported lazily by name so a missing optional dependency (onnxruntime, triton, tensorrt)
only matters when that backend is asked for, and then gives one clear BackendError.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from ..errors import BackendError, BackendUnavailable
from ..ir import Graph
from ..spec import LayerSpec

# A runner takes x [B, S, H] and returns outputs by name: at least "out", plus the routing record
# ("expert_idx" and "weights" for token-choice, "rows" for expert-choice) where the backend exposes it.
Runner = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class BuildResult:
    files: list[Path]
    notes: list[str] = field(default_factory=list)


class Backend(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    # Pass pipeline the backend lowers (names from moe_ir.passes); the default: clean up only.
    pipeline: ClassVar[tuple[str, ...]] = ("dce",)
    # The `moe-ir build` options (keyword arguments of build(), besides progress) this backend takes; the CLI
    # refuses any other it is given, so an option never silently does nothing.
    build_options: ClassVar[frozenset[str]] = frozenset()

    def supports(self, graph: Graph) -> tuple[bool, str]:
        """(True, "") or (False, reason) for the graph after this backend's pipeline."""
        return True, ""

    @abc.abstractmethod
    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        """Lower and load in-process, ready to run."""

    def build(self, spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path,
              **options: Any) -> BuildResult:
        raise BackendError(f"backend '{self.name}' runs in-process only; it writes no artifact "
                           f"(use it with `moe-ir validate`)")


# name -> "module:Class" relative to moe_ir.backends; one line per backend.
_BACKENDS: dict[str, str] = {
    "reference": "reference:ReferenceBackend",
    "torch": "torch_eager:TorchBackend",
    "compile": "compile:CompileBackend",
    "onnx": "onnx:OnnxBackend",
    "aoti": "aoti:AotiBackend",
    "tensorrt": "tensorrt:TensorRTBackend",
    "triton": "triton.backend:TritonBackend",
}


def register_backend(name: str, target: str) -> None:
    _BACKENDS[name] = target


def backend_names() -> list[str]:
    return list(_BACKENDS)


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}'; available: {', '.join(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(f"moe_ir.backends.{module_name}")
    except ImportError as err:
        raise BackendUnavailable(f"backend '{name}' needs a package that is not installed: {err.name or err} "
                           f"(install the extra: pip install 'moe-ir[all]')") from None
    return getattr(module, cls_name)()
