"""The `aoti` backend: torch.export of the layer with dynamic batch/sequence dims, compiled by
AOTInductor into one `.pt2` package that runs with torch alone (`torch._inductor.aoti_load_package`,
no moe-ir import), on CPU here and on GPU where the package is built there.

The exported module (`ExportableMoE`) is lowered from the IR graph through the op table every torch
backend shares (`torch_ops`), whose kernels give `torch.export` no data-dependent Python control flow:
dispatch counts have a fixed length (`count_ids`, not bincount), and under tracing the grouped expert FFN
is `torch_kernels.grouped_ffn_traced` (one GEMM chain per expert on a slice bounded by unbacked group
ends, of any length including 0; nothing branches on a size). Weight-only subgraphs from the fusion
passes (CONCAT/ADD on weights, e.g. fused gate/up) are folded once into buffers (`torch_ops.fold_weights`),
so the package computes nothing on weights per call.

Model graphs (moe_ir.model_builder: input_ids -> logits) export the same way, with B and S of input_ids
dynamic: the model ops (embedding, RMSNorm, attention, MLA) read only shapes and options, never data, so
they trace as they are. The package returns `logits` and each MoE layer's `layers.{i}.expert_idx` /
`layers.{i}.weights`; its metadata records the input contract (input_ids, vocabulary size), which the
runner checks.

Decode graphs (form decode) export with every graph input in the graph's order (input_ids,
attention_mask, position_ids, past_key_values.*) and batch, new-token count and past length dynamic, the
past length from 0: one package serves the prefill (empty past) and every decode step. It returns the
logits, the present cache (`present.*`) and the routing record; its metadata lists the input names, so the
runner takes and returns tensors by graph name (a moe_ir.generation.Step).

A package is code: its shared library runs when torch loads it. The build puts a manifest inside the
package (the sha256 of every member); `load_runner` checks the archive's structure and that manifest
before torch sees the file, so a damaged package is one clear error rather than a crash.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from moe_ir.artifacts import OutputFolder
from moe_ir.errors import BackendError, MoeIRError
from moe_ir.interpreter import check_weights
from moe_ir.ir import MODEL_INPUT, MODEL_OUTPUT, Graph, GraphKind, OpCode, from_json, to_json
from moe_ir.model_builder import decode_contract_problem, is_decode_graph
from moe_ir.model_spec import ModelSpec
from moe_ir.passes import run_pipeline
from moe_ir.quantization import quantized_formats
from moe_ir.spec import LayerSpec
from .base import Backend, BuildResult, Runner, check_token_ids
from .integrity import append_manifest, verify_archive
from .torch_ops import INFERENCE_RUNTIME, fold_weights, lower_node, unsupported_ops, weight_only_nodes

PIPELINE = ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce")
OUTPUTS = ("out", "expert_idx", "weights", "rows")
# Per MoE layer of a model graph, the package returns `layers.{i}.<one of these>` beside the logits.
MODEL_ROUTING = ("expert_idx", "weights", "rows")
# A decode graph's present cache outputs, returned beside the logits.
PRESENT_PREFIX = "present."
Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------------------------------------
# the exportable module


def _package_outputs(graph: Graph) -> list[str]:
    """Output keys the package returns: a layer's `out` and routing record, or a model's logits, the
    routing record of each MoE layer and (decode graphs) the present cache."""
    if graph.kind == GraphKind.MODEL:
        return [k for k in graph.outputs if k == MODEL_OUTPUT or k.startswith(PRESENT_PREFIX) or
                (k.startswith("layers.") and k.rsplit(".", 1)[-1] in MODEL_ROUTING)]
    return [k for k in graph.outputs if k in OUTPUTS]


class ExportableMoE(nn.Module):
    """The inference layer as an export-friendly module: forward(x [B,S,H]) -> {"out", routing record};
    for a model graph forward(input_ids [B,S] int64) -> {"logits", "layers.{i}.expert_idx", ...}; for a
    decode graph forward(*the graph's inputs in order) -> {"logits", "present.*", routing record}.

    Each node runs as the torch op table says (`torch_ops`, the eager module's table), whose kernels trace
    without data-dependent control flow; weight-only nodes (the fusion passes' CONCATs) are folded once
    into buffers, so the package computes nothing on weights per call."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor]):
        super().__init__()
        check_weights(graph, weights)
        missing = unsupported_ops(graph)
        if missing:
            raise BackendError(f"aoti: no exportable implementation of op(s) {', '.join(missing)}")
        folded = fold_weights(graph, weights)
        constants = {**weights, **folded}
        weight_only = {n.name for n in weight_only_nodes(graph)}
        nodes = [n for n in graph.nodes if n.name not in weight_only]
        read = dict.fromkeys(v.name for n in nodes for v in n.inputs if v is not None and v.name in constants)
        # Weights and folded values read by the remaining nodes become buffers: constants of the package.
        self._env_names: dict[str, str] = {}
        for i, name in enumerate(read):
            attr = f"w{i}"
            self.register_buffer(attr, constants[name].detach().clone().contiguous())
            self._env_names[name] = attr
        self._plan = [(lower_node(n), tuple(None if v is None else v.name for v in n.inputs),
                       tuple(v.name for v in n.outputs)) for n in nodes]
        self._inputs = [v.name for v in graph.inputs]
        self._outputs = [(k, graph.outputs[k].name) for k in _package_outputs(graph)]

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        env: dict[str, Any] = dict(zip(self._inputs, inputs))
        for name, attr in self._env_names.items():
            env[name] = getattr(self, attr)
        for call, operands, outputs in self._plan:
            result = call([None if i is None else env[i] for i in operands], INFERENCE_RUNTIME)
            for name, value in zip(outputs, (result,) if len(outputs) == 1 else result):
                env[name] = value
        return {key: env[name] for key, name in self._outputs}


# ------------------------------------------------------------------------------------------------
# export, compile, load


def _lowered(graph: Graph) -> Graph:
    return run_pipeline(from_json(to_json(graph)), PIPELINE)


def _example_inputs(graph: Graph) -> tuple[torch.Tensor, ...]:
    # Example sizes above 1: export specialises dims whose example size is 0 or 1.
    if is_decode_graph(graph):
        return _decode_example(graph)
    if graph.kind == GraphKind.MODEL:
        return (torch.randint(0, _vocab_size(graph), (2, 3), dtype=torch.int64),)
    x_type = graph.inputs[0].type
    return (torch.randn(2, 3, x_type.shape[-1], dtype=x_type.dtype.torch),)


def _decode_example(graph: Graph) -> tuple[torch.Tensor, ...]:
    """A decode call of batch 2 with 3 new tokens after 4 cached ones, in the graph's input order."""
    from moe_ir.generation import KVCache, decode_inputs

    batch, new, past = 2, 3, 4
    ids = torch.randint(0, _vocab_size(graph), (batch, new), dtype=torch.int64)
    cache = KVCache.empty(graph, batch)
    cache.tensors = {name: torch.randn(t.shape[0], t.shape[1], past, t.shape[3], dtype=t.dtype)
                     for name, t in cache.tensors.items()}
    inputs = decode_inputs(ids, torch.ones(batch, past + new, dtype=torch.int64), cache)
    return tuple(inputs[v.name].contiguous() for v in graph.inputs)


def _dynamic_shapes(graph: Graph) -> tuple[dict[int, Any], ...]:
    """B and S dynamic; a decode graph's past length P too, from 0 (the prefill), and its mask's P + S."""
    big = 1 << 20
    batch, new = torch.export.Dim("B", min=1, max=big), torch.export.Dim("S", min=1, max=big)
    if not is_decode_graph(graph):
        return ({0: batch, 1: new},)
    past = torch.export.Dim("P", min=0, max=big)
    # The mask's length is P + S, a sum export cannot declare: AUTO lets it find that relation itself.
    dims = {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
            "position_ids": {0: batch, 1: new}}
    return tuple(dims.get(v.name, {0: batch, 2: past}) for v in graph.inputs)


def _vocab_size(graph: Graph) -> int:
    return int(graph.weights["embed.weight"].type.shape[0])


def export_program(graph: Graph, weights: Mapping[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of the layer (x [B, S, H]) or the model (input_ids [B, S]) with B and S dynamic; of a
    decode graph with its inputs in order, B, S and the past length dynamic."""
    module = ExportableMoE(_lowered(graph), weights).eval()
    try:
        with torch.no_grad():
            return torch.export.export(module, _example_inputs(graph), dynamic_shapes=(_dynamic_shapes(graph),),
                                       strict=False)
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
# Decode packages: the graph's input names in call order, comma-separated.
META_DECODE_INPUTS = "moe_ir.decode_inputs"

# The package's integrity manifest: a member under the archive's `extra/` folder (which torch's loader
# leaves alone) holding the sha256 and size of every other member.
PACKAGE_MANIFEST = "extra/moe_ir_manifest.json"
# What an AOTInductor package holds (torch 2.13's .pt2 layout, below the archive's one root folder) and
# what it must hold.
PACKAGE_LAYOUT = ("archive_format", "archive_version", "byteorder", "version", ".data/", "data/", "extra/",
                  "models/")
PACKAGE_REQUIRED = ("archive_format", "data/aotinductor/")


def _package_metadata(graph: Graph) -> dict[str, str]:
    if is_decode_graph(graph):
        return {META_INPUT: MODEL_INPUT, META_VOCAB: str(_vocab_size(graph)),
                META_DECODE_INPUTS: ",".join(v.name for v in graph.inputs)}
    if graph.kind == GraphKind.MODEL:
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
            # The sha256 of every member, inside the package, so that it stays one file that checks itself.
            append_manifest(staged, PACKAGE_MANIFEST, {"torch": torch.__version__})
            os.replace(staged, tmp)
        finally:
            if os.path.exists(staged):
                os.unlink(staged)

    try:
        out = atomic_write(path, write)
    except MoeIRError:  # the writer's own errors (a full disk, say) say what happened
        raise
    except Exception as err:
        raise BackendError(f"aoti: compilation failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    if progress is not None:
        progress("done", 2, 2)
    return out


def verify_package(path: str | Path, *, allow_unverified: bool = False) -> dict | None:
    """Check a .pt2 before torch loads it: a zip whose members all sit under one root folder with safe
    names (no absolute or `..` names, no symlinks: torch extracts the shared library by these names), the
    layout of an AOTInductor package, and the moe-ir manifest written at build time: exactly its members,
    each with its size and sha256. Returns the manifest (None for a package without one, accepted only
    with `allow_unverified`). Raises BackendError.

    This catches a damaged or edited package, which would otherwise crash the loading process (flipped
    bytes in the shared library end in a segmentation fault). It does not make an untrusted package safe:
    whoever can edit a package can rewrite its manifest, and its shared library runs at load."""
    return verify_archive(path, PACKAGE_MANIFEST, f"{path}: AOTInductor package", required=PACKAGE_REQUIRED,
                          allowed_prefixes=PACKAGE_LAYOUT, allow_unverified=allow_unverified)


def load_runner(path: str | Path, *, allow_unverified: bool = False) -> Runner:
    """Run a .pt2 package: x [B,S,H] (layer) or input_ids int64 [B,S] (model) -> outputs by name.

    A .pt2 is code, not data: loading it runs the compiled shared library inside it. Load only packages you
    built or trust like code. The package is checked first (verify_package: archive structure, then the
    sha256 of every member against the manifest written at build), so a damaged file is a BackendError, not
    a crash; `allow_unverified=True` loads a package without a moe-ir manifest (built elsewhere) after the
    structure checks alone."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such AOTInductor package")
    verify_package(path, allow_unverified=allow_unverified)
    try:
        compiled = torch._inductor.aoti_load_package(str(path))
    except Exception as err:
        raise BackendError(f"{path}: not a loadable AOTInductor package ({type(err).__name__}); rebuild it with "
                           f"`moe-ir build --backend aoti`") from None
    meta = compiled.get_metadata()
    if META_DECODE_INPUTS in meta:
        return _decode_runner(compiled, meta[META_DECODE_INPUTS].split(","), int(meta[META_VOCAB]), path)
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
        # The package reads the buffer as int64 [B, S] whatever it is given: check it first.
        check_token_ids(input_ids, vocab, "aoti runner", allow_empty=False)
        try:
            with torch.no_grad():
                return dict(compiled(input_ids.contiguous()))
        except Exception as err:
            raise BackendError(f"aoti runner failed on input_ids {list(input_ids.shape)} ({path.name}): "
                               f"{str(err).strip()[:300]}") from None

    return run


def _decode_runner(compiled: Any, names: list[str], vocab: int, path: Path) -> Runner:
    """A decode package's step: the graph's inputs by name -> its outputs by name (moe_ir.generation.Step)."""
    def step(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [name for name in names if name not in inputs]
        if missing:
            raise BackendError(f"aoti decode runner: missing input(s) {', '.join(missing[:4])} ({path.name} takes "
                               f"{', '.join(names[:4])}, ...)")
        ids = inputs["input_ids"]
        check_token_ids(ids, vocab, "aoti decode runner", allow_empty=False)
        try:
            with torch.no_grad():
                return dict(compiled(*(inputs[name].contiguous() for name in names)))
        except Exception as err:
            raise BackendError(f"aoti decode runner failed on input_ids {list(ids.shape)} ({path.name}): "
                               f"{str(err).strip()[:300]}") from None

    return step


class AotiBackend(Backend):
    name = "aoti"
    summary = "torch.export + AOTInductor: one .pt2 package (dynamic B,S) that runs with torch alone"
    pipeline = PIPELINE

    def supports(self, graph: Graph) -> tuple[bool, str]:
        problem = decode_contract_problem(graph) if is_decode_graph(graph) else graph.contract_problem()
        if problem:
            return False, problem
        formats = quantized_formats(graph)
        if formats:
            return False, (f"quantized weights ({', '.join(sorted(f.value for f in formats))}) are not exported to an "
                           "AOTInductor package yet; the torch and compile backends run them")
        if any(n.op == OpCode.BALANCE_LOSS for n in _lowered(graph).nodes):
            return False, "balance losses are training outputs; aoti packages inference graphs"
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no exportable implementation of op(s) {', '.join(missing)}"
        # A model's input is token ids: its activations take the weights' dtype.
        typed = graph.weights.values() if graph.kind == GraphKind.MODEL else graph.inputs
        low = sorted({v.type.dtype.value for v in typed if v.type.dtype.value in ("bf16", "f16")})
        if low and not torch.cuda.is_available():
            # Measured with torch 2.13 on CPU: the package compiles, then a fallback kernel call fails at run
            # time ("Mismatch between ints consumed and num_ints"); refuse up front rather than ship it.
            return False, (f"{'/'.join(low)} packages built by AOTInductor (torch {torch.__version__}) fail at run "
                           "time on CPU in a fallback kernel call; use float32 on CPU")
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, package: str | Path | None = None,
                **options: Any) -> Runner:
        """Compile to a temp package and load it (~25 s on CPU); `package=` reuses an existing .pt2, which
        runs code at load (load_runner checks it first; trust it like code)."""
        if package is not None:
            return load_runner(package)
        with tempfile.TemporaryDirectory(prefix="moe-ir-aoti-") as tmp:
            path = compile_package(graph, weights, Path(tmp) / "layer.pt2")
            return load_runner(path)

    def write_artifact(self, spec: LayerSpec | ModelSpec, graph: Graph, weights: Mapping[str, torch.Tensor],
                       out: OutputFolder, *, progress: Progress | None = None, **options: Any) -> BuildResult:
        """OUT/<name>.pt2, committed by `build`."""
        ok, reason = self.supports(graph)
        if not ok:
            raise BackendError(f"aoti cannot package spec '{spec.name}': {reason}")
        if isinstance(spec, ModelSpec) != (graph.kind == GraphKind.MODEL):
            raise BackendError(f"aoti: spec '{spec.name}' and graph '{graph.name}' are not both a model or both a "
                               "layer; build the graph from the same spec")
        name = f"{spec.name}.pt2"
        compile_package(graph, weights, out.path(name), progress)
        path = out.final(name)
        if is_decode_graph(graph):
            call = ("the decode graph's inputs in order (input_ids, attention_mask, position_ids, past_key_values.*: "
                    "the metadata's 'moe_ir.decode_inputs'); returns {'logits', 'present.*', routing record}")
        elif graph.kind == GraphKind.MODEL:
            call = "input_ids int64 [B, S]; returns {'logits', 'layers.{i}.expert_idx', 'layers.{i}.weights'}"
        else:
            call = "x [B, S, H]; returns {'out', routing record}"
        return BuildResult(files=[path], notes=[f"load with torch._inductor.aoti_load_package(path) (torch only); "
                                                f"call it with {call}",
                                                "a .pt2 runs its compiled code at load: load it only where you "
                                                "trust it like code (moe-ir's runner checks its manifest first)"])
