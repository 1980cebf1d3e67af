"""What every backend provides, and the registry the CLI and the validation harness use.

A backend answers `supports(graph)` with (ok, reason) before anything is lowered, so the CLI can print a
support matrix and a user gets a reason instead of a crash deep inside a compiler. `prepare` lowers the
graph with given weights to something runnable in-process (used by `moe-ir validate`); `build` writes a
deployable artifact into a folder (used by `moe-ir build`): a backend implements `write_artifact`, which
writes only through the OutputFolder it is handed (moe_ir.artifacts), and `build` commits that folder, so
every backend's output is confined to the folder and complete or unchanged.

The registry (name -> backend class, imported lazily) is in registry.py.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch

from moe_ir.artifacts import OutputFolder
from moe_ir.errors import BackendError, BackendUnavailable, MoeIRError
from moe_ir.ir import Graph
from moe_ir.spec import LayerSpec



def select_triton_mode() -> None:
    """Run Triton kernels in Triton's interpreter on a machine without CUDA.

    Triton decides once, when triton.language is first imported, whether kernels run compiled or in its
    interpreter, and torch.compile imports it long before the Triton backend runs. Every backend imports
    this module first, so the choice is made here; an explicit TRITON_INTERPRET from the user wins."""
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


select_triton_mode()

# A runner takes x [B, S, H] and returns outputs by name: at least "out", plus the routing record
# ("expert_idx" and "weights" for token-choice, "rows" for expert-choice) where the backend exposes it.
Runner = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class BuildResult:
    files: list[Path]
    notes: list[str] = field(default_factory=list)
    # A build that writes what it can and then stops (TensorRT without TensorRT: the bundle, no engine):
    # `build` commits the files, then raises this.
    unfinished: MoeIRError | None = None


class Backend(abc.ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    # Pass pipeline the backend lowers (names from moe_ir.passes); the default: clean up only.
    pipeline: ClassVar[tuple[str, ...]] = ("dce",)
    # The `moe-ir build` options (keyword arguments of build(), besides progress) this backend takes; the CLI
    # refuses any other it is given, so an option never silently does nothing.
    build_options: ClassVar[frozenset[str]] = frozenset()
    # `build` lowers the training graph (balance losses, router logits, loads) rather than the inference one:
    # the torch backend's model.py is a module people train.
    lowers_training_graph: ClassVar[bool] = False
    # Variants the registry name may carry after a colon ("onnx:ort", "expert_parallel:2"); the default
    # backend list (`moe-ir validate` without --backends) runs each of `default_variants`.
    default_variants: ClassVar[tuple[str, ...]] = ()

    def __init__(self, variant: str | None = None):
        if variant is not None:
            raise BackendError(f"backend '{self.name}' has no variants (got '{self.name}:{variant}')")

    @property
    def label(self) -> str:
        """The name this backend answers to in reports and on the command line ("onnx:ort")."""
        return self.name

    def supports(self, graph: Graph) -> tuple[bool, str]:
        """(True, "") or (False, reason) for the graph after this backend's pipeline."""
        return True, ""

    @abc.abstractmethod
    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        """Lower and load in-process, ready to run."""

    def build(self, spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path,
              **options: Any) -> BuildResult:
        """Write the artifact into `out_dir`: staged, then swapped in whole (moe_ir.artifacts.OutputFolder);
        on any failure `out_dir` is left as it was."""
        if type(self).write_artifact is Backend.write_artifact:
            raise BackendError(f"backend '{self.name}' runs in-process only; it writes no artifact "
                               f"(use it with `moe-ir validate`)")
        with OutputFolder(out_dir, what=f"{self.label} build") as out:
            result = self.write_artifact(spec, graph, weights, out, **options)
        if result.unfinished is not None:
            raise result.unfinished
        return result

    def write_artifact(self, spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out: OutputFolder,
                       **options: Any) -> BuildResult:
        """Write the artifact's files through `out` (out.path(name) to write, out.claim(name) for a file that
        is written only sometimes, out.final(name) for the path it will have); return them as final paths."""
        raise NotImplementedError


def check_token_ids(input_ids: Any, vocab: int, where: str, *, allow_empty: bool = True) -> None:
    """A model runner's input: int64 [B, S] with every id in [0, vocab). Checked before running, since an id out
    of range would index past the embedding (silently, in a compiled package); the range check reads the data."""
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 and input_ids.dtype == torch.int64):
        got = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else \
            type(input_ids).__name__
        raise BackendError(f"{where}: input_ids must be int64 [B, S], got {got}")
    if input_ids.numel() == 0 and not allow_empty:
        raise BackendError(f"{where}: input_ids {list(input_ids.shape)} is empty")
    if input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise BackendError(f"{where}: token ids must be in [0, {vocab}), got {low}..{high}")


class Unavailable(Backend):
    """Stands in for a backend this machine cannot load (a missing package): every question is answered
    with the reason, as a BackendUnavailable, so reports list it as skipped with that reason."""

    summary = "not available on this machine"
    pipeline = ()

    def __init__(self, label: str, reason: str):
        self.name = label.partition(":")[0]
        self._label = label
        self.reason = reason

    @property
    def label(self) -> str:
        return self._label

    def supports(self, graph: Graph) -> tuple[bool, str]:
        raise BackendUnavailable(self.reason)

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        raise BackendUnavailable(self.reason)
