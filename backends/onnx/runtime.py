"""Running exported models in ONNX Runtime: sessions, runners for layer and whole-model files, and why a
file cannot run here.

Runners: a layer file runs x [B,S,H] -> {"out", routing record}; a whole-model file (build_model_graph) runs
input_ids int64 [B,S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"}, the graph's output keys,
telling the two apart by the file's input type (metadata `moe_ir.kind` says it too).
Providers: CUDA (and TensorRT when asked for) where onnxruntime has them, else CPU. The plugin flavour
runs on CPU only, through onnxruntime-extensions (extensions.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from moe_ir.errors import BackendError, BackendUnavailable
from moe_ir.ir import Graph
from ..base import Runner
from . import extensions
from .external_data import load_model
from .flavours import parse_flavour
from .lowering import Flavour

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
                 threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if flavour == Flavour.PLUGIN:
        opts.register_custom_ops_library(extensions.register())
    where = model if isinstance(model, str) else "<in-memory model>"
    try:
        return ort.InferenceSession(model, opts, providers=list(providers or default_providers(flavour)))
    except Exception as err:  # onnxruntime raises its own pybind exception types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(f"{where}: onnxruntime cannot load this model ({first}); re-export it with "
                           f"`moe-ir build --backend onnx`") from None


def make_runner(session, graph: Graph | None = None) -> Runner:
    """A runner over a session: x [B,S,H] -> {"out", routing record} as torch tensors; for a whole model
    input_ids [B,S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"} (make_model_runner)."""
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
        try:
            results = session.run(out_names, feed)
        except Exception as err:  # onnxruntime raises its own pybind exception types
            raise BackendError(f"{where} failed on input_ids {list(input_ids.shape)}: "
                               f"{str(err).strip()[:300]}") from None
        out = {}
        for name, arr in zip(out_names, results):
            t = torch.from_numpy(np.ascontiguousarray(arr))
            out[name] = t.to(out_dtypes[name]) if name in out_dtypes else t
        return out

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
        model: str | bytes = extensions.to_contrib_domain(proto).SerializeToString()
    else:
        model = str(path)
    return make_runner(make_session(model, flavour, providers=providers, threads=threads))
