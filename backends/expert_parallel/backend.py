"""The `expert_parallel` backend: a layer graph run by N local processes, the routed experts split over them.

`expert_parallel:N` (N ranks, shared experts replicated) or `expert_parallel:N-tp` (shared experts split
tensor-parallel); no variant means N = 2. The runner the harness gets writes the graph (JSON), the weights
and the input (safetensors) into a private temporary folder, starts N processes with `spawn_local`
(gloo over loopback, bounded timeouts), and each rank reads the graph, only its own slice of the weights
and its share of the tokens: the B*S tokens are split into N contiguous blocks (a rank may get none), as
data-parallel ranks would hold them. Each rank runs `ExpertParallelMoE` on its block; "out", "expert_idx"
and "weights" are gathered on rank 0 as tensors, which writes them for the caller. Nothing is pickled
between processes except multiprocessing's own start-up arguments (strings and numbers).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from moe_ir.errors import BackendError
from moe_ir.interpreter import check_weights
from moe_ir.ir import Graph, from_json, to_json
from moe_ir.params import save_weights
from moe_ir.spec import SharedPlacement
from ..base import Backend, Runner
from .comm import gather_rows
from .launch import DEFAULT_TIMEOUT, spawn_local
from .lower import check_graph
from .module import PIPELINE, ExpertParallelMoE
from .placement import Placement

__all__ = ["ExpertParallelBackend", "RUNNER_OUTPUTS", "run_rank"]

# What the runner returns (the layer output and the token-choice routing record validation compares).
RUNNER_OUTPUTS = ("out", "expert_idx", "weights")
DEFAULT_RANKS = 2
_VARIANT = re.compile(r"(?P<ranks>[1-9][0-9]*)(?P<tp>-tp)?")


def run_rank(rank: int, world: int, folder: str, shared: str) -> None:
    """One rank of the runner (in its own process): its slice of the weights, its block of tokens, the
    layer, and the outputs gathered on rank 0, which writes them to `folder`/outputs.safetensors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    work = Path(folder)
    graph = from_json((work / "graph.json").read_text())
    placement = Placement.of(graph, world, SharedPlacement(shared))
    shard = {}
    with safe_open(str(work / "weights.safetensors"), framework="pt") as stored:
        for name in placement.shapes:
            axis = placement.shard_dim(name)
            if axis is None:
                shard[name] = stored.get_tensor(name)
            else:  # read only this rank's slice of a split weight
                start, length = placement.block(placement.shapes[name][axis], rank)
                index = [slice(None)] * (axis + 1)
                index[axis] = slice(start, start + length)
                shard[name] = stored.get_slice(name)[tuple(index)]
    layer = ExpertParallelMoE(graph, shard, shared=SharedPlacement(shared)).eval()
    x = load_file(str(work / "inputs.safetensors"))["x"]
    tokens = x.reshape(-1, x.shape[-1])
    mine = torch.tensor_split(tokens, world)[rank]
    with torch.no_grad():
        result = layer(mine.reshape(1, -1, x.shape[-1]))
    found = {"out": result.out.reshape(-1, result.out.shape[-1]), **result.routing}
    gathered = {name: gather_rows(found[name].contiguous(), 0) for name in RUNNER_OUTPUTS if name in found}
    if rank == 0:
        save_weights(gathered, work / "outputs.safetensors")


class ExpertParallelBackend(Backend):
    name = "expert_parallel"
    summary = ("expert parallelism on N local processes (torch.distributed, gloo over loopback): routed experts "
               "split over the ranks, tokens exchanged by all-to-all; variant N or N-tp")
    pipeline = PIPELINE
    default_variants = (str(DEFAULT_RANKS),)
    # What each spawned process runs: rank_main(rank, world, folder, shared). A module-level function,
    # since spawned processes import it by name.
    rank_main = staticmethod(run_rank)

    def __init__(self, variant: str | None = None, *, timeout: float = DEFAULT_TIMEOUT):
        match = _VARIANT.fullmatch(variant) if variant is not None else _VARIANT.fullmatch(str(DEFAULT_RANKS))
        if match is None:
            raise BackendError(f"backend 'expert_parallel:{variant}': the variant is the number of local processes, "
                               "optionally with -tp for tensor-parallel shared experts (e.g. expert_parallel:2, "
                               "expert_parallel:4-tp)")
        self.ranks = int(match["ranks"])
        self.shared = SharedPlacement.TENSOR_PARALLEL if match["tp"] else SharedPlacement.REPLICATED
        self.variant = match.group(0)
        self.timeout = timeout

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}"

    def supports(self, graph: Graph) -> tuple[bool, str]:
        try:
            check_graph(graph, self.ranks, self.shared)
        except BackendError as err:
            return False, str(err)
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        if options:
            raise BackendError(f"backend '{self.label}' takes no options, got {', '.join(sorted(options))}")
        check_graph(graph, self.ranks, self.shared)
        check_weights(graph, weights)
        graph_text = to_json(graph)

        def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
            if x.dim() != 3:
                raise BackendError(f"backend '{self.label}': expected x [B, S, H], got {list(x.shape)}")
            with tempfile.TemporaryDirectory(prefix="moe-ir-ep-run-") as folder:
                work = Path(folder)
                (work / "graph.json").write_text(graph_text)
                save_weights(weights, work / "weights.safetensors")
                save_weights({"x": x}, work / "inputs.safetensors")
                threads = max(1, (os.cpu_count() or 1) // self.ranks)
                spawn_local(self.rank_main, self.ranks, folder, self.shared.value, threads=threads,
                            timeout=self.timeout)
                from safetensors.torch import load_file

                got = load_file(str(work / "outputs.safetensors"))
            got["out"] = got["out"].view(x.shape[0], x.shape[1], -1)
            return got

        return run
