"""The `aoti` backend: torch.export of the layer with dynamic batch/sequence dims, compiled by
AOTInductor into one `.pt2` package that runs with torch alone (`torch._inductor.aoti_load_package`,
no moe-ir import), on CPU here and on GPU where the package is built there.

The exported module (`ExportableMoE`) is lowered from the IR graph like the eager backend, but every op
is written so `torch.export` sees no data-dependent Python control flow: dispatch counts have a fixed
length (`count_ids`, not bincount), the expert FFNs split the sorted rows by the group sizes as unbacked
sizes (one GEMM chain per expert on a slice of any length, including 0), and nothing branches on a size.
The eager grouped FFN, when compiled, follows the same rules (kernels.grouped_ffn_traced); this module
keeps its own because it runs on the inference pipeline's fused gate/up weights and evaluates
weight-only subgraphs from the fusion passes (CONCAT/ADD on weights) once into buffers, so the package
computes nothing on weights per call.

Model graphs (moe_ir.model_builder: input_ids -> logits) export the same way, with B and S of input_ids
dynamic: the model ops (embedding, RMSNorm, attention, MLA) call the eager backend's kernels, which read
only shapes and options, never data, so they trace as they are (one implementation of attention for
every torch backend). The package returns `logits` and each MoE layer's `layers.{i}.expert_idx` /
`layers.{i}.weights`; its metadata records the input contract (input_ids, vocabulary size), which the
runner checks.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from moe_ir.errors import BackendError
from moe_ir.interpreter import check_weights
from moe_ir.ir import Graph, OpCode, Value, from_json, op_def, to_json
from moe_ir.ir.ops import activate, route_topk, scale_weights
from moe_ir.model_spec import ModelSpec
from moe_ir.passes import run_pipeline
from moe_ir.spec import DropRule, LayerSpec
from .base import Backend, BuildResult, Runner
from . import torch_kernels as K
from .torch_eager.module import MODEL_INPUT, MODEL_OUTPUT, graph_contract_problem, is_model_graph

PIPELINE = ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce")
OUTPUTS = ("out", "expert_idx", "weights", "rows")
# Per MoE layer of a model graph, the package returns `layers.{i}.<one of these>` beside the logits.
MODEL_ROUTING = ("expert_idx", "weights", "rows")
Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------
# export-friendly op implementations (same semantics as the reference in moe_ir.ir.ops)


def _dispatch(attrs, expert_idx, weights):
    t, k = expert_idx.shape
    n_exp = attrs["num_experts"]
    flat_e = expert_idx.reshape(-1)
    flat_w = weights.reshape(-1)
    arange = torch.arange(flat_e.shape[0], device=flat_e.device)
    key = flat_e
    kept = None
    if attrs["capacity_factor"] is not None:
        a = flat_e.shape[0]
        capacity = torch.clamp(torch.ceil(torch.tensor(attrs["capacity_factor"], dtype=torch.float64)
                                          * a / n_exp), min=1).to(torch.int64)
        if attrs["drop_rule"] == DropRule.POSITION:
            rank = (arange % k) * t + arange // k  # slot-major priority (GShard)
            order = torch.argsort(flat_e * a + rank, stable=True)
        else:
            by_weight = torch.argsort(-flat_w, stable=True)
            order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]
        sorted_e = flat_e[order]
        counts = K.count_ids(flat_e, n_exp)
        starts = torch.cumsum(counts, 0) - counts
        position = arange - starts[sorted_e]
        kept = torch.zeros_like(flat_e, dtype=torch.bool).scatter(0, order, position < capacity)
        key = torch.where(kept, flat_e, torch.full_like(flat_e, n_exp))
    order = torch.argsort(key, stable=True)
    row_w = flat_w[order]
    if kept is not None:
        row_w = torch.where(kept[order], row_w, torch.zeros_like(row_w))
    return order // k, row_w, K.count_ids(key, n_exp + 1)[:n_exp]


def _expert_choice(attrs, scores):
    t, n_exp = scores.shape
    c = min(t, max(1, math.ceil(attrs["capacity_factor"] * t * attrs["top_k"] / n_exp)))
    weights, tokens = scores.t().topk(c, dim=-1)
    return tokens.reshape(-1), weights.reshape(-1), torch.full((n_exp,), c, dtype=torch.int64)


def _ffn(attrs, x, w_up, w_down, w_gate, b_up, b_down, b_gate):
    act = attrs["activation"]
    if act.gated and w_gate is None:  # gate_up_fused: one GEMM, gate columns first
        gate, up = F.linear(x, w_up, b_up).chunk(2, dim=-1)
    else:
        up = F.linear(x, w_up, b_up)
        gate = F.linear(x, w_gate, b_gate) if act.gated else None
    return F.linear(activate(act, gate, up), w_down, b_down)


def _grouped_ffn(attrs, x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate):
    n_exp = w_up.shape[0]
    xs = x.index_select(0, rows)
    # Group sizes become unbacked sizes; the checks tell export they are valid split sizes.
    sizes = group_sizes.tolist()
    for s in sizes:
        torch._check(s >= 0)
    tail = rows.shape[0] - sum(sizes)
    torch._check(tail >= 0)
    parts = torch.split(xs, sizes + [tail])
    pick = lambda w, e: None if w is None else w[e]  # noqa: E731
    ys = [_ffn(attrs, parts[e], w_up[e], w_down[e], pick(w_gate, e), pick(b_up, e), pick(b_down, e),
               pick(b_gate, e)) for e in range(n_exp)]
    ys.append(parts[n_exp] * 0)  # dropped rows: zeros, as in the reference
    return torch.cat(ys)


def _combine(y, rows, row_w, like):
    return torch.zeros(like.shape[0], y.shape[1], dtype=y.dtype, device=y.device).index_add(
        0, rows, y * row_w.to(y.dtype).unsqueeze(-1))


def _route(attrs, scores, bias):
    return route_topk(scores, bias, attrs["k"], attrs["groups"], attrs["kept"], attrs["group_score"])


def _fused_moe(attrs, x, w_router, bias, w_up, w_down, w_gate, b_up, b_down, b_gate):
    logits = F.linear(x.to(attrs["router_dtype"].torch), w_router)
    scores = torch.softmax(logits, -1) if attrs["score"] == "softmax" else torch.sigmoid(logits)
    idx, w = _route(attrs, scores, bias)
    w = scale_weights(w, attrs["normalize"], attrs["scale"])
    rows, row_w, sizes = _dispatch({"num_experts": w_up.shape[0], **attrs}, idx, w)
    y = _grouped_ffn(attrs, x, rows, sizes, w_up, w_down, w_gate, b_up, b_down, b_gate)
    return _combine(y, rows, row_w, x), idx, w


_OPS: dict[OpCode, Callable[..., Any]] = {
    OpCode.FLATTEN_TOKENS: lambda a, x: x.reshape(-1, x.shape[-1]),
    OpCode.RESTORE_TOKENS: lambda a, y, like: y.reshape(like.shape[0], like.shape[1], y.shape[-1]),
    OpCode.LINEAR: lambda a, x, w, b: F.linear(x.to(a["out_dtype"].torch), w, b),
    OpCode.ROUTER_NOISE: lambda a, logits, x, w: logits,  # inference: noise is training-only
    OpCode.SCORE: lambda a, logits: torch.softmax(logits, -1) if a["fn"] == "softmax" else torch.sigmoid(logits),
    OpCode.TOPK_ROUTE: _route,
    OpCode.SCALE_WEIGHTS: lambda a, w: scale_weights(w, a["normalize"], a["scale"]),
    OpCode.DISPATCH: _dispatch,
    OpCode.EXPERT_CHOICE_ROUTE: _expert_choice,
    OpCode.GROUPED_FFN: _grouped_ffn,
    OpCode.COMBINE: lambda a, y, rows, rw, like: _combine(y, rows, rw, like),
    OpCode.FFN: _ffn,
    OpCode.SIGMOID_GATE: lambda a, y, x, w: y * torch.sigmoid(F.linear(x, w)),
    OpCode.ADD: lambda a, x, y: x + y,
    OpCode.CONCAT: lambda a, *parts: torch.cat(parts, dim=a["axis"]),
    OpCode.FUSED_MOE: _fused_moe,
    OpCode.EMBEDDING: lambda a, ids, w: K.embedding(ids, w),
    OpCode.RMS_NORM: lambda a, x, w: K.rms_norm(x, w, a["eps"]),
    OpCode.ATTENTION: lambda a, x, *w: K.attention(x, *w, a["heads"], a["kv_heads"], a["head_dim"], a["qk_norm"].value,
                                                   a["rope_theta"], a["rope_layout"].value, a["norm_eps"]),
    OpCode.MLA_ATTENTION: lambda a, x, *w: K.mla_attention(
        x, *w, a["heads"], a["kv_lora_rank"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"],
        a["rope_theta"], a["rope_layout"].value, a["norm_eps"]),
}


def _package_outputs(graph: Graph) -> list[str]:
    """Output keys the package returns: a layer's `out` and routing record, or a model's logits and the
    routing record of each MoE layer."""
    if is_model_graph(graph):
        return [k for k in graph.outputs if k == MODEL_OUTPUT or
                (k.startswith("layers.") and k.rsplit(".", 1)[-1] in MODEL_ROUTING)]
    return [k for k in graph.outputs if k in OUTPUTS]


class ExportableMoE(nn.Module):
    """The inference layer as an export-friendly module: forward(x [B,S,H]) -> {"out", routing record};
    for a model graph forward(input_ids [B,S] int64) -> {"logits", "layers.{i}.expert_idx", ...}."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        check_weights(graph, weights)
        missing = sorted({n.op.value for n in graph.nodes if n.op not in _OPS})
        if missing:
            raise BackendError(f"aoti: no exportable implementation of op(s) {', '.join(missing)}")
        folded = _weight_only(graph)
        env_names: dict[str, str] = {}
        # Folded values (and plain weights) become buffers: constants of the package.
        for i, value in enumerate(v for v in _values_read(graph) if v.name in folded):
            with torch.no_grad():
                tensor = _evaluate(value, weights)
            attr = f"w{i}"
            self.register_buffer(attr, tensor.detach().clone().contiguous())
            env_names[value.name] = attr
        self._env_names = env_names
        self._plan = [(_OPS[n.op], n.attrs, tuple(None if v is None else v.name for v in n.inputs),
                       tuple(v.name for v in n.outputs)) for n in graph.nodes
                      if not all(v.name in folded for v in n.outputs)]
        self._input = graph.inputs[0].name
        self._outputs = [(k, graph.outputs[k].name) for k in _package_outputs(graph)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = {self._input: x}
        for name, attr in self._env_names.items():
            env[name] = getattr(self, attr)
        for fn, attrs, inputs, outputs in self._plan:
            result = fn(attrs, *[None if i is None else env[i] for i in inputs])
            for name, value in zip(outputs, result if isinstance(result, tuple) else (result,)):
                env[name] = value
        return {key: env[name] for key, name in self._outputs}


def _weight_only(graph: Graph) -> set[str]:
    names = set(graph.weights)
    for node in graph.nodes:
        operands = [v for v in node.inputs if v is not None]
        if operands and all(v.name in names for v in operands):
            names.update(v.name for v in node.outputs)
    return names


def _values_read(graph: Graph) -> list[Value]:
    """Values read by nodes that are not themselves folded, in first-use order."""
    folded = _weight_only(graph)
    seen: dict[str, Value] = {}
    for node in graph.nodes:
        if all(v.name in folded for v in node.outputs):
            continue
        for v in node.inputs:
            if v is not None and v.name not in seen:
                seen[v.name] = v
    return list(seen.values())


def _evaluate(value: Value, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if value.producer is None:
        return weights[value.name]
    node = value.producer
    args = [None if v is None else _evaluate(v, weights) for v in node.inputs]
    return op_def(node.op).reference(node.attrs, *args)[value.index]


# ------------------------------------------------------------------------------------------------
# export, compile, load


def _lowered(graph: Graph) -> Graph:
    return run_pipeline(from_json(to_json(graph)), PIPELINE)


def _example_input(graph: Graph) -> torch.Tensor:
    # Example sizes above 1: export specialises dims whose example size is 0 or 1.
    if is_model_graph(graph):
        return torch.randint(0, _vocab_size(graph), (2, 3), dtype=torch.int64)
    x_type = graph.inputs[0].type
    return torch.randn(2, 3, x_type.shape[-1], dtype=x_type.dtype.torch)


def _vocab_size(graph: Graph) -> int:
    return int(graph.weights["embed.weight"].type.shape[0])


def export_program(graph: Graph, weights: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of the layer (x [B, S, H]) or the model (input_ids [B, S]) with B and S dynamic."""
    module = ExportableMoE(_lowered(graph), weights).eval()
    example = _example_input(graph)
    dims = {"x": {0: torch.export.Dim("B", min=1, max=1 << 20), 1: torch.export.Dim("S", min=1, max=1 << 20)}}
    try:
        with torch.no_grad():
            return torch.export.export(module, (example,), dynamic_shapes=dims, strict=False)
    except Exception as err:
        raise BackendError(f"aoti: torch.export failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None


# Package metadata (plain strings, readable without moe-ir through `get_metadata()`): the input contract,
# which the runner checks because the compiled package itself does not (x with a wrong hidden size runs and
# returns garbage unless AOTI_RUNTIME_CHECK_INPUTS=1 is set in the environment).
META_HIDDEN = "moe_ir.hidden"
META_DTYPE = "moe_ir.dtype"
# Model packages: the input's name ("input_ids"; absent for layer packages) and the vocabulary size.
META_INPUT = "moe_ir.input"
META_VOCAB = "moe_ir.vocab_size"


def _package_metadata(graph: Graph) -> dict[str, str]:
    if is_model_graph(graph):
        return {META_INPUT: MODEL_INPUT, META_VOCAB: str(_vocab_size(graph))}
    x_type = graph.inputs[0].type
    return {META_HIDDEN: str(int(x_type.shape[-1])), META_DTYPE: str(x_type.dtype.torch).removeprefix("torch.")}


def compile_package(graph: Graph, weights: Mapping[str, torch.Tensor], path: Path,
                    progress: Progress | None = None) -> Path:
    """Export and compile to `path` (.pt2) through a temp file renamed into place."""
    from moe_ir.params import atomic_write

    metadata = _package_metadata(graph)

    if progress is not None:
        progress("export", 0, 2)
    program = export_program(graph, weights)
    if progress is not None:
        progress("compile", 1, 2)

    def write(tmp: str) -> None:
        # aoti_compile_and_package insists on a .pt2 suffix; compile next to the target, then move.
        staged = tmp + ".pt2"
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=staged,
                                                     inductor_configs={"aot_inductor.metadata": metadata})
            os.replace(staged, tmp)
        finally:
            if os.path.exists(staged):
                os.unlink(staged)

    try:
        out = atomic_write(path, write)
    except BackendError:
        raise
    except Exception as err:
        raise BackendError(f"aoti: compilation failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    if progress is not None:
        progress("done", 2, 2)
    return out


def load_runner(path: str | Path) -> Runner:
    """Run a .pt2 package: x [B,S,H] (layer) or input_ids int64 [B,S] (model) -> outputs by name."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such AOTInductor package")
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
    except Exception as err:
        raise BackendError(f"{path}: not a loadable AOTInductor package ({type(err).__name__}); rebuild it with "
                           f"`moe-ir build --backend aoti`") from None
    meta = compiled.get_metadata()
    if meta.get(META_INPUT) == MODEL_INPUT:
        return _model_runner(compiled, int(meta[META_VOCAB]), path)
    hidden = int(meta[META_HIDDEN]) if META_HIDDEN in meta else None  # None: a package from before the metadata
    dtype = getattr(torch, meta[META_DTYPE]) if META_DTYPE in meta else None

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 3 or (hidden is not None and x.shape[-1] != hidden):
            raise BackendError(f"aoti runner: x must be [B, S, {hidden or 'H'}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise BackendError(f"aoti runner: x must be floating point, got {x.dtype}")
        if dtype is not None:
            x = x.to(dtype)  # the package's input type, as the ONNX runner feeds the model's type
        try:
            with torch.no_grad():
                return dict(compiled(x.contiguous()))
        except Exception as err:
            raise BackendError(f"aoti runner failed on x {list(x.shape)}: {str(err).strip()[:300]}") from None

    return run


def _model_runner(compiled: Any, vocab: int, path: Path) -> Runner:
    def run(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        # The package reads the buffer as int64 [B, S] whatever it is given; wrong ids would index out of
        # the embedding silently, so shape, dtype and range are checked here.
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            got = f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else \
                type(input_ids).__name__
            raise BackendError(f"aoti runner: input_ids must be int64 [B, S], got {got}")
        if input_ids.numel() == 0:
            raise BackendError(f"aoti runner: input_ids {list(input_ids.shape)} is empty")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab:
            raise BackendError(f"aoti runner: token ids must be in [0, {vocab}), got {low}..{high}")
        try:
            with torch.no_grad():
                return dict(compiled(input_ids.contiguous()))
        except Exception as err:
            raise BackendError(f"aoti runner failed on input_ids {list(input_ids.shape)} ({path.name}): "
                               f"{str(err).strip()[:300]}") from None

    return run


class AotiBackend(Backend):
    name = "aoti"
    summary = "torch.export + AOTInductor: one .pt2 package (dynamic B,S) that runs with torch alone"
    pipeline = PIPELINE

    def supports(self, graph: Graph) -> tuple[bool, str]:
        problem = graph_contract_problem(graph)
        if problem:
            return False, problem
        if any(n.op == OpCode.BALANCE_LOSS for n in _lowered(graph).nodes):
            return False, "balance losses are training outputs; aoti packages inference graphs"
        missing = sorted({n.op.value for n in graph.nodes if n.op not in _OPS and n.op != OpCode.BALANCE_LOSS})
        if missing:
            return False, f"no exportable implementation of op(s) {', '.join(missing)}"
        # A model's input is token ids: its activations take the weights' dtype.
        typed = graph.weights.values() if is_model_graph(graph) else graph.inputs
        low = sorted({v.type.dtype.value for v in typed if v.type.dtype.value in ("bf16", "f16")})
        if low and not torch.cuda.is_available():
            # Measured with torch 2.13 on CPU: the package compiles, then a fallback kernel call fails at run
            # time ("Mismatch between ints consumed and num_ints"); refuse up front rather than ship it.
            return False, (f"{'/'.join(low)} packages built by AOTInductor (torch {torch.__version__}) fail at run "
                           "time on CPU in a fallback kernel call; use float32 on CPU")
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, package: str | Path | None = None,
                **options: Any) -> Runner:
        """Compile to a temp package and load it (~25 s on CPU); `package=` reuses an existing .pt2."""
        if package is not None:
            return load_runner(package)
        with tempfile.TemporaryDirectory(prefix="moe-ir-aoti-") as tmp:
            path = compile_package(graph, weights, Path(tmp) / "layer.pt2")
            return load_runner(path)

    def build(self, spec: LayerSpec | ModelSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path, *,
              progress: Progress | None = None, **options: Any) -> BuildResult:
        ok, reason = self.supports(graph)
        if not ok:
            raise BackendError(f"aoti cannot package spec '{spec.name}': {reason}")
        if isinstance(spec, ModelSpec) != is_model_graph(graph):
            raise BackendError(f"aoti: spec '{spec.name}' and graph '{graph.name}' are not both a model or both a "
                               "layer; build the graph from the same spec")
        path = compile_package(graph, weights, Path(out_dir) / f"{spec.name}.pt2", progress)
        call = "input_ids int64 [B, S]; returns {'logits', 'layers.{i}.expert_idx', 'layers.{i}.weights'}" \
            if is_model_graph(graph) else "x [B, S, H]; returns {'out', routing record}"
        return BuildResult(files=[path], notes=[f"load with torch._inductor.aoti_load_package(path) (torch only); "
                                                f"call it with {call}"])
