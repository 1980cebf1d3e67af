"""Running exported models in ONNX Runtime: sessions, runners for layer and whole-model files, and why a
file cannot run here.

Runners: a layer file runs x [B,S,H] -> {"out", routing record}; a whole-model file (build_model_graph) runs
input_ids int64 [B,S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"}, the graph's output keys,
telling the two apart by the file's input type (metadata `moe_ir.kind` says it too).
Providers: CUDA (and TensorRT when asked for) where onnxruntime has them, else CPU. The plugin flavour
runs on CPU only, through onnxruntime-extensions (extensions.py).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch

from moe_ir.errors import BackendError, BackendUnavailable
from moe_ir.ir import ElemType, Graph
from moe_ir.model_builder import DECODE_INPUTS, CacheEntry
from ..base import Runner
from . import extensions
from .external_data import load_model
from .flavours import parse_flavour
from .genai import DECODER_FILE
from .lowering import Flavour
from .quant_ops import QMOE_FLOAT_ACTIVATIONS_ENV, asks_int8_activations

_FEED_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def runtime_refusal(dtypes, flavour: Flavour) -> str:
    """Why moe-ir cannot run an export with these IR dtypes ('f32', 'f16', 'bf16') in ONNX Runtime here
    ('' when it can). Judged from the types, not by trying: a session that fails half-way through
    loading says less than this."""
    if "bf16" not in dtypes:
        return ""
    import onnxruntime as ort

    where = " (the plugin flavour runs there only on CPU)" if flavour == Flavour.PLUGIN else ""
    return (f"bfloat16 models do not run in ONNX Runtime from moe-ir{where}: bf16 MatMul/Gemm/Add/Mul kernels are "
            f"not installed in onnxruntime {ort.__version__}'s CPU provider, and its Python API has no bf16 numpy "
            f"type; `moe-ir build` still writes the file (for TensorRT or onnxruntime-gpu)")


def default_providers(flavour: Flavour) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if flavour == Flavour.PLUGIN:
        return ["CPUExecutionProvider"]  # the extensions' Python op runs on CPU
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(model: str | bytes, flavour: Flavour, *, providers: Sequence[str] | None = None,
                 threads: int | None = None, int8_activations: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    # No spin-waiting after a call: the runner is called from Python between torch work, and ONNX Runtime's
    # spinning threads would take the cores that work needs (eager float32 decode of a layer measured 5x slower
    # right after an ONNX Runtime call in the same process).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if flavour == Flavour.PLUGIN:
        opts.register_custom_ops_library(extensions.register())
    where = model if isinstance(model, str) else "<in-memory model>"
    try:
        # int8 activations (a file exported with them): the variable stays as it is, so the nodes decide. One
        # session is made at a time: the variable is process-wide, and another thread's session must not see it.
        with _SESSION_CREATION, contextlib.nullcontext() if int8_activations else qmoe_float_activations():
            return ort.InferenceSession(model, opts, providers=list(providers or default_providers(flavour)))
    except Exception as err:  # onnxruntime raises its own pybind exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(f"{where}: onnxruntime cannot load this model ({first}); re-export it with "
                           f"`moe-ir build --backend onnx`") from None


_SESSION_CREATION = threading.Lock()


@contextlib.contextmanager
def qmoe_float_activations():
    """While a session is created: QMoE's CPU kernel keeps float32 activations for 8-bit experts (it reads
    the variable then), so the int8 export equals the quantized reference; a value the user set is kept."""
    name, value = QMOE_FLOAT_ACTIVATIONS_ENV
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def make_runner(session, graph: Graph | None = None) -> Runner:
    """A runner over a session: x [B,S,H] -> {"out", routing record} as torch tensors; for a whole model
    input_ids [B,S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"} (make_model_runner)."""
    names = {i.name for i in session.get_inputs()}
    if "attention_mask" in names and "input_ids" in names:
        return make_decode_runner(session, graph)
    if session.get_inputs()[0].type == "tensor(int64)":
        return make_model_runner(session, graph)
    x_info = session.get_inputs()[0]
    hidden = x_info.shape[-1]
    out_names = [o.name for o in session.get_outputs()]
    out_dtypes = {}
    if graph is not None:
        out_dtypes = {k: v.type.dtype.torch for k, v in graph.outputs.items()}

    if x_info.type not in _FEED_TYPES:
        raise BackendError(f"onnx runner: input {x_info.name} is {x_info.type}, which onnxruntime's Python API "
                           f"cannot be fed (float and float16 can)")
    feed_type = _FEED_TYPES[x_info.type]

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.dim() != 3 or (isinstance(hidden, int) and x.shape[-1] != hidden):
            raise BackendError(f"onnx runner: x must be [B, S, {hidden}], got {list(x.shape)}")
        if not x.is_floating_point():
            raise BackendError(f"onnx runner: x must be floating point, got {x.dtype}")
        # In the model's input type (float32 upcast first: numpy cannot take bfloat16 tensors).
        feed = {x_info.name: x.detach().to(torch.float32).cpu().contiguous().numpy().astype(feed_type, copy=False)}
        try:
            results = session.run(out_names, feed)
        except Exception as err:
            raise BackendError(f"onnx runner failed on x {list(x.shape)}: {str(err).strip()[:300]}") from None
        out = {}
        for name, arr in zip(out_names, results):
            t = torch.from_numpy(np.ascontiguousarray(arr))
            if name in out_dtypes:
                t = t.to(out_dtypes[name])
            elif name == "expert_idx":
                t = t.to(torch.int64)
            out[name] = t
        return out

    return run


def make_model_runner(session, graph: Graph | None = None) -> Runner:
    """run(input_ids int64 [B, S]) -> every output of the model by its graph key, as torch tensors.

    Token ids are checked against the vocabulary here: ONNX Gather wraps negative indices around, so an id
    of -1 would silently read the last row where the reference (and transformers) refuse it."""
    ids_info = session.get_inputs()[0]
    meta = session.get_modelmeta().custom_metadata_map
    vocab = int(meta["moe_ir.vocab_size"]) if meta.get("moe_ir.vocab_size", "").isdigit() else None
    out_names = [o.name for o in session.get_outputs()]
    out_dtypes = {k: v.type.dtype.torch for k, v in graph.outputs.items()} if graph is not None else {}
    where = f"onnx runner ({ids_info.name})"

    def run(input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            got = (f"{input_ids.dtype} {list(input_ids.shape)}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise BackendError(f"{where}: token ids must be an int64 tensor [B, S], got {got}")
        if vocab is not None and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab:
                raise BackendError(f"{where}: token ids must be in [0, {vocab}), found "
                                   f"{low if low < 0 else high}")
        feed = {ids_info.name: input_ids.detach().cpu().contiguous().numpy()}
        return run_session(session, out_names, feed, out_dtypes, where, input_ids.shape)

    return run


def run_session(session, out_names: Sequence[str], feed: Mapping, out_dtypes: Mapping[str, torch.dtype], where: str,
                ids_shape) -> dict[str, torch.Tensor]:
    """One ONNX Runtime call of a runner: its outputs as torch tensors (in the graph's dtypes where ONNX
    Runtime returns another), a failure as one BackendError naming the call's input_ids shape."""
    try:
        results = session.run(list(out_names), dict(feed))
    except Exception as err:  # onnxruntime raises its own pybind exception types
        raise BackendError(f"{where} failed on input_ids {list(ids_shape)}: {str(err).strip()[:300]}") from None
    out = {}
    for name, arr in zip(out_names, results):
        t = torch.from_numpy(np.ascontiguousarray(arr))
        out[name] = t.to(out_dtypes[name]) if name in out_dtypes else t
    return out


_INT_INPUTS = ("input_ids", "attention_mask", "position_ids")


def make_decode_runner(session, graph: Graph | None = None) -> Runner:
    """A Step of a decode-form file (moe_ir.generation): the graph's inputs by name (input_ids, attention_mask,
    position_ids, the past cache) -> its outputs by name (logits, the present cache, any routing record).

    Everything is checked before onnxruntime runs: the ids against the vocabulary (ONNX Gather wraps negative
    indices around), the mask and positions against the ids, and each past cache tensor against the file's
    [B, heads, P, dim] with one P for all of them and P + S tokens in the mask, so a cache of the wrong layout
    or length is named instead of failing deep inside a Concat or MatMul."""
    meta = session.get_modelmeta().custom_metadata_map
    vocab = int(meta["moe_ir.vocab_size"]) if meta.get("moe_ir.vocab_size", "").isdigit() else None
    infos = {i.name: i for i in session.get_inputs()}
    missing = [n for n in _INT_INPUTS if n not in infos]
    if missing:
        raise BackendError(f"onnx decode runner: the file has no input {', '.join(missing)}; it is not a decoder "
                           f"moe-ir built (`moe-ir build --backend onnx --decoder`)")
    past = [i for i in session.get_inputs() if i.name not in _INT_INPUTS]
    for info in past:
        if info.type not in _FEED_TYPES:
            raise BackendError(f"onnx decode runner: cache input {info.name} is {info.type}, which onnxruntime's "
                               f"Python API cannot be fed (float and float16 can)")
    out_names = [o.name for o in session.get_outputs()]
    out_dtypes = {k: v.type.dtype.torch for k, v in graph.outputs.items()} if graph is not None else {}
    where = "onnx decode runner"

    def check(inputs: Mapping[str, torch.Tensor]) -> None:
        absent = [n for n in infos if n not in inputs]
        if absent:
            raise BackendError(f"{where}: missing input(s) {', '.join(absent[:4])}; a step takes input_ids, "
                               f"attention_mask, position_ids and every past_key_values.* tensor")
        for name in _INT_INPUTS:
            t = inputs[name]
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2:
                got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise BackendError(f"{where}: {name} must be an int64 tensor [B, ...], got {got}")
        ids, mask, positions = (inputs[n] for n in _INT_INPUTS)
        b, s = ids.shape
        if positions.shape != ids.shape or mask.shape[0] != b:
            raise BackendError(f"{where}: position_ids {list(positions.shape)} must be input_ids' shape {[b, s]} and "
                               f"attention_mask {list(mask.shape)} must have {b} rows")
        if vocab is not None and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab:
                raise BackendError(f"{where}: token ids must be in [0, {vocab}), found {low if low < 0 else high}")
        lengths = set()
        for info in past:
            t = inputs[info.name]
            _, heads, _, dim = info.shape
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != b or \
                    (isinstance(heads, int) and t.shape[1] != heads) or (isinstance(dim, int) and t.shape[3] != dim):
                got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise BackendError(f"{where}: {info.name} is {got}; this decoder's cache is [B={b}, {heads}, P, {dim}] "
                                   f"(a cache of another model or layout)")
            lengths.add(int(t.shape[2]))
        if len(lengths) > 1:
            raise BackendError(f"{where}: the past cache tensors hold different lengths {sorted(lengths)}; every "
                               f"layer's cache must hold the same P tokens")
        cached = lengths.pop() if lengths else 0
        if mask.shape[1] != cached + s:
            raise BackendError(f"{where}: attention_mask covers {mask.shape[1]} tokens, but the past cache holds "
                               f"{cached} and input_ids {s} new ones ({cached + s} expected)")

    def run(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check(inputs)
        feed = {n: inputs[n].detach().cpu().contiguous().numpy() for n in _INT_INPUTS}
        for info in past:
            t = inputs[info.name].detach().cpu()
            if t.dtype not in (torch.float32, torch.float16):
                t = t.to(torch.float32)
            feed[info.name] = t.contiguous().numpy().astype(_FEED_TYPES[info.type], copy=False)
        return run_session(session, out_names, feed, out_dtypes, where, inputs['input_ids'].shape)

    return run


def load_runner(path: str | Path, *, providers: Sequence[str] | None = None, threads: int | None = None) -> Runner:
    """Run an exported .onnx file (any flavour; read from its metadata). A plugin model is run on CPU
    through onnxruntime-extensions, which needs it in memory (under 2 GiB).

    An ONNX file is data: its external-data locations must name regular files inside its folder (no
    absolute paths, no `..`, no symlinks leading out, no FIFOs or devices), checked before onnxruntime
    opens any of them (external_data.check_external_data)."""
    path = Path(path)
    proto = load_model(path)  # refuses external data outside the model's folder before anything reads it
    meta = {p.key: p.value for p in proto.metadata_props}
    flavour = parse_flavour(meta.get("moe_ir.flavour", "portable"))
    bf16 = onnx.TensorProto.BFLOAT16
    if any(v.type.tensor_type.elem_type == bf16 for v in proto.graph.input) or \
            any(t.data_type == bf16 for t in proto.graph.initializer):
        raise BackendUnavailable(f"{path}: {runtime_refusal({'bf16'}, flavour)}")
    if flavour == Flavour.PLUGIN:
        try:
            onnx.load_external_data_for_model(proto, str(path.parent))
        except (OSError, onnx.checker.ValidationError) as err:  # a missing or unreadable .data file
            raise BackendError(f"{path}: cannot read its external weights ({str(err).strip()[:200]}); keep the "
                               f"model's .data file beside it, or re-export with `moe-ir build --backend onnx`") from None
        try:
            model: str | bytes = extensions.to_contrib_domain(proto).SerializeToString()
        except BackendError as err:  # a malformed plugin node: named with the file it is in
            raise BackendError(f"{path}: {err}") from None
    else:
        model = str(path)
    return make_runner(make_session(model, flavour, providers=providers, threads=threads,
                                    int8_activations=asks_int8_activations(meta)))


# ------------------------------------------------------------------------------------------------
# a built decoder folder (`moe-ir build --backend onnx --decoder`)


@dataclass
class Decoder:
    """An ONNX decoder file loaded for generation: `step` (moe_ir.generation.Step), the cache tensors it
    takes and returns (what moe_ir.generation.greedy_generate feeds back), its vocabulary and flavour."""
    path: Path
    step: Runner
    entries: list[CacheEntry]
    vocab_size: int | None
    flavour: Flavour


_ELEM_TYPES = {onnx.TensorProto.FLOAT: ElemType.FLOAT32, onnx.TensorProto.FLOAT16: ElemType.FLOAT16,
               onnx.TensorProto.BFLOAT16: ElemType.BFLOAT16}


def decoder_cache_entries(proto: onnx.ModelProto, where: str) -> list[CacheEntry]:
    """The cache tensors of a decoder file, read from its inputs: each `past_key_values.{i}.{slot}` [B, heads,
    P, dim] with its `present.{i}.{slot}` output, in input order."""
    outputs = {o.name for o in proto.graph.output}
    entries = []
    for info in proto.graph.input:
        if info.name in DECODE_INPUTS:
            continue
        parts = info.name.split(".")
        dims = info.type.tensor_type.shape.dim
        if len(parts) != 3 or parts[0] != "past_key_values" or not parts[1].isdigit() or len(dims) != 4:
            raise BackendError(f"{where}: input '{info.name}' is not a past cache tensor "
                               f"(past_key_values.<layer>.<slot> [B, heads, P, dim]); not a decoder moe-ir built")
        present = f"present.{parts[1]}.{parts[2]}"
        if present not in outputs:
            raise BackendError(f"{where}: cache input '{info.name}' has no '{present}' output; not a decoder "
                               f"moe-ir built")
        elem = info.type.tensor_type.elem_type
        if elem not in _ELEM_TYPES or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value"):
            raise BackendError(f"{where}: cache input '{info.name}' must be a float tensor [B, heads, P, dim] with "
                               f"fixed heads and dim")
        entries.append(CacheEntry(int(parts[1]), info.name, present, dims[1].dim_value, dims[3].dim_value,
                                  _ELEM_TYPES[elem]))
    if not entries:
        raise BackendError(f"{where}: no past_key_values.* input: a prefill-only model; build the decoder with "
                           f"`moe-ir build --backend onnx --decoder`")
    return entries


def load_decoder(folder: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> Decoder:
    """The decoder of a folder `moe-ir build --backend onnx --decoder` wrote (model.onnx, or the .onnx file
    itself), ready to generate with moe-ir's loop. Its external data is checked first (load_model)."""
    path = Path(folder)
    if path.is_dir():
        path = path / DECODER_FILE
    proto = load_model(path, "ONNX decoder")
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("moe_ir.form") != "decode":
        raise BackendError(f"{path}: not a decoder (a file without a KV cache); build one with "
                           f"`moe-ir build --backend onnx --decoder`")
    entries = decoder_cache_entries(proto, str(path))
    vocab = int(meta["moe_ir.vocab_size"]) if meta.get("moe_ir.vocab_size", "").isdigit() else None
    flavour = parse_flavour(meta.get("moe_ir.flavour", "portable"))
    step = make_runner(make_session(str(path), flavour, providers=providers, threads=threads,
                                    int8_activations=asks_int8_activations(meta)))
    return Decoder(path, step, entries, vocab, flavour)
