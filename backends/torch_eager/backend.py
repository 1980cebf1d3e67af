"""The `torch` backend: the eager module in-process, and a standalone model.py bundle as the artifact.

Layer graphs lower to `MoELayer` (runner: x [B, S, H] -> {"out", routing record}); model graphs to
`MoEModel` (runner: input_ids int64 [B, S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"});
decode graphs to a generating `MoEModel` (runner: the graph's inputs by name -> its outputs by name, a
moe_ir.generation.Step).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import yaml

from moe_ir.artifacts import OutputFolder
from moe_ir.builder import spec_hash
from moe_ir.errors import BackendError
from moe_ir.ir import Graph, GraphKind
from moe_ir.model_builder import decode_contract_problem, is_decode_graph, model_spec_hash
from moe_ir.model_spec import ModelSpec, model_spec_to_dict
from moe_ir.params import save_weights
from moe_ir.spec import LayerSpec, spec_to_dict
from ..base import Backend, BuildResult, Runner
from .codegen import generate_source
from .module import GraphModule, ModelOutput, MoELayer, MoEModel, unsupported_ops

# Outputs a runner passes on: the layer output and the routing record validation compares.
RUNNER_OUTPUTS = ("out", "expert_idx", "weights", "rows")
# A model runner passes `logits` and, per MoE layer, `layers.{i}.<one of these>`.
ROUTING_RECORD = ("expert_idx", "weights", "rows")


def runner_outputs(result: Any) -> dict[str, torch.Tensor]:
    """A module's forward result -> the runner's outputs by name (the layer's or the model's contract)."""
    if isinstance(result, ModelOutput):
        record = {k: v for k, v in result.routing.items() if k.rsplit(".", 1)[-1] in ROUTING_RECORD}
        return {"logits": result.logits, **record}
    found = {"out": result.out, **result.routing}
    return {key: found[key] for key in RUNNER_OUTPUTS if key in found}


def lower(graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, **options: Any) -> GraphModule:
    """The eager module of a layer graph (MoELayer) or a model graph (MoEModel)."""
    int4_activations = options.pop("int4_activations", None)
    if int4_activations not in (None, "bf16", "fused"):
        raise BackendError(f"int4_activations={int4_activations!r}: expected None (exact), 'fused' (exact, compiled "
                           f"int4 decode kernel) or 'bf16'")
    module = (MoEModel if graph.kind == GraphKind.MODEL else MoELayer)(graph, weights, **options)
    module.int4_activations = int4_activations
    return module


def make_runner(module: torch.nn.Module) -> Runner:
    module.eval()
    check = module.check_input_ids if isinstance(module, MoEModel) else None
    if isinstance(module, MoEModel) and module.cache_entries:
        def step(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            module.check_input_ids(inputs.get("input_ids"))
            with torch.no_grad():
                return module.step(inputs)

        return step

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if check is not None:
            check(x)
        with torch.no_grad():
            res = module(x)
        return runner_outputs(res)

    return run


class TorchBackend(Backend):
    name = "torch"
    summary = "eager PyTorch module (trainable, every routing and balance policy); builds a standalone model.py"
    pipeline = ("dce",)
    lowers_training_graph = True

    def supports(self, graph: Graph) -> tuple[bool, str]:
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no eager implementation of op(s) {', '.join(missing)}"
        problem = decode_contract_problem(graph) if is_decode_graph(graph) else graph.contract_problem()
        if problem:
            return False, problem
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        return make_runner(lower(graph, weights, **options))

    def write_artifact(self, spec: LayerSpec | ModelSpec, graph: Graph, weights: Mapping[str, torch.Tensor],
                       out: OutputFolder, **options: Any) -> BuildResult:
        """OUT/model.py, OUT/weights.safetensors and OUT/spec.yaml, committed together by `build` (a layer spec
        with its layer graph, or a model spec with its model graph)."""
        model = isinstance(spec, ModelSpec)
        if model != (graph.kind == GraphKind.MODEL):
            raise BackendError(f"torch build: spec '{spec.name}' is a {'model' if model else 'layer'} spec but graph "
                               f"'{graph.name}' is a {graph.kind.value} graph; build the graph from the same spec")
        if model:
            digest, spec_data, aux_free = model_spec_hash(spec), model_spec_to_dict(spec), spec.moe.balance.aux_free
        else:
            digest, spec_data, aux_free = spec_hash(spec), spec_to_dict(spec), spec.balance.aux_free
        # model.py is emitted from the graph; the spec only supplies its docstring and the bias update rate γ
        # (a training setting the graph does not carry).
        spec_yaml = yaml.safe_dump(spec_data, sort_keys=False).rstrip().splitlines()
        source = generate_source(graph, description=["    " + line for line in spec_yaml],
                                 gamma=aux_free.gamma if aux_free is not None else None)
        # The module checks names and shapes (one WeightsError listing every mismatch) before anything is written.
        module = lower(graph, weights)
        out.path("model.py").write_text(source)
        save_weights(module.canonical_weights(), out.path("weights.safetensors"),
                     {"spec_hash": digest, "format": "moe-ir canonical"})
        out.path("spec.yaml").write_text(yaml.safe_dump(spec_data, sort_keys=False))
        names = ("model.py", "weights.safetensors", "spec.yaml")
        return BuildResult(files=[out.final(name) for name in names],
                           notes=[f"standalone PyTorch module: {out.final('model.py')} (depends on torch only)"])
