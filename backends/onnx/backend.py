"""The `onnx` backend: lower (lower.py), write atomically, and run in ONNX Runtime.

One backend with a `flavour` option (portable | ort | plugin). Each flavour has its own pass pipeline;
`prepare` and `build` run it on a copy of the graph they are given (the passes are idempotent, so a graph
that already went through it is fine), which lets callers hand over either the raw or the lowered graph.
Runners: a layer file runs x [B,S,H] -> {"out", routing record}; a whole-model file (build_model_graph) runs
input_ids int64 [B,S] -> {"logits", "layers.{i}.expert_idx", "layers.{i}.weights"}, the graph's output keys,
telling the two apart by the file's input type (metadata `moe_ir.kind` says it too).
Providers: CUDA (and TensorRT when asked for) where onnxruntime has them, else CPU. The plugin flavour
runs on CPU only, through onnxruntime-extensions (extensions.py).

Precision (what runs where; `build` writes every supported dtype, `prepare`/`load_runner` refuse with a
BackendError naming the reason where ONNX Runtime cannot run the file):
  float32   every flavour, CPU (and CUDA for portable/ort);
  float16   portable: CPU (onnxruntime inserts float32 casts around fp16 nodes its CPU provider has no
            kernel for), CUDA; plugin: CPU, the FusedMoE stand-in computing in float32 (extensions.py);
  bfloat16  exported only (for TensorRT, or onnxruntime-gpu in the user's own code): onnxruntime's CPU
            provider has no bfloat16 arithmetic kernels (MatMul, Gemm, Add, Mul, Sigmoid, ...), and its
            Python API has no numpy type to hand bfloat16 tensors in or out.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch

from moe_ir.errors import BackendError, BackendUnavailable, MoeIRError
from moe_ir.ir import Graph, from_json, to_json
from moe_ir.model_spec import ModelSpec
from moe_ir.passes import run_pipeline
from moe_ir.spec import LayerSpec
from ..base import Backend, BuildResult, Runner
from . import extensions
from .lower import PIPELINES, Flavour, LoweredModel, lower, stored_values, supports, to_numpy

# Above this many initializer bytes a model is written with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
_ALIGN = 4096  # external tensors start on page boundaries so ONNX Runtime can map them

Progress = Callable[[str, int, int], None]  # (step, done, total): e.g. ("weights", bytes written, bytes)

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}
_FEED_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _copy(graph: Graph) -> Graph:
    return from_json(to_json(graph))


def lowered_graph(graph: Graph, flavour: Flavour | str) -> Graph:
    """A copy of `graph` after the flavour's pipeline."""
    return run_pipeline(_copy(graph), PIPELINES[Flavour(flavour)])


class OnnxBackend(Backend):
    name = "onnx"
    summary = "ONNX (opset 18): portable standard ops | ort (com.microsoft.MoE) | plugin (moe_ir::FusedMoE); runs in ONNX Runtime"
    build_options = frozenset({"flavour", "external_data"})
    default_variants = tuple(f.value for f in Flavour)

    def __init__(self, flavour: Flavour | str | None = None):
        self.flavour = _flavour(flavour or Flavour.PORTABLE)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.flavour.value}"

    @property
    def pipeline(self) -> tuple[str, ...]:  # type: ignore[override]
        return PIPELINES[self.flavour]

    def supports(self, graph: Graph, *, flavour: Flavour | str | None = None) -> tuple[bool, str]:
        flavour = _flavour(flavour or self.flavour)
        try:
            return supports(lowered_graph(graph, flavour), flavour)
        except MoeIRError as err:
            return False, str(err)

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, flavour: Flavour | str | None = None,
                providers: Sequence[str] | None = None, threads: int | None = None, **options: Any) -> Runner:
        flavour = _flavour(flavour or self.flavour)
        piped = lowered_graph(graph, flavour)
        refusal = runtime_refusal({v.type.dtype.value for v in stored_values(piped)}, flavour)
        if refusal:
            raise BackendUnavailable(f"onnx/{flavour.value}: {refusal}")
        lowered = lower(piped, weights, flavour)
        with tempfile.TemporaryDirectory(prefix="moe-ir-onnx-") as tmp:
            if lowered.initializer_bytes() > EXTERNAL_DATA_THRESHOLD:
                # Too big for one protobuf: write with external data, load, then drop the files
                # (ONNX Runtime has read or mapped them; an unlinked mapping stays valid).
                path = write_model(lowered, Path(tmp) / "model.onnx", external_data=True,
                                   for_runtime=flavour == Flavour.PLUGIN)
                model: str | bytes = str(path)
            else:
                model = _embedded(lowered, for_runtime=flavour == Flavour.PLUGIN).SerializeToString()
            session = make_session(model, flavour, providers=providers, threads=threads)
        return make_runner(session, graph)

    def build(self, spec: LayerSpec | ModelSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path, *,
              flavour: Flavour | str | None = None, external_data: bool | None = None,
              progress: Progress | None = None, **options: Any) -> BuildResult:
        """Write OUT/<name>.<flavour>.onnx (and .onnx.data when external), atomically. `spec` is the layer's
        or, for a whole-model graph (build_model_graph), the model's; only its name is used here."""
        flavour = _flavour(flavour or self.flavour)
        piped = lowered_graph(graph, flavour)
        ok, reason = supports(piped, flavour)
        if not ok:
            raise BackendError(f"onnx/{flavour.value} cannot export spec '{spec.name}': {reason}")
        lowered = lower(piped, weights, flavour)
        if external_data is None:
            external_data = lowered.initializer_bytes() > EXTERNAL_DATA_THRESHOLD
        path = Path(out_dir) / f"{spec.name}.{flavour.value}.onnx"
        files = [write_model(lowered, path, external_data=external_data, progress=progress)]
        if external_data:
            files.append(path.with_name(path.name + ".data"))
        dtypes = sorted({v.type.dtype.value for v in stored_values(piped)})
        notes = [f"opset 18, dynamic dims B,S; flavour {flavour.value}; {'/'.join(dtypes)}"]
        refusal = runtime_refusal(dtypes, flavour)
        if refusal:
            notes.append(f"not runnable by moe-ir's ONNX Runtime runner: {refusal}")
        if flavour == Flavour.ORT:
            notes.append("needs onnxruntime (com.microsoft.MoE contrib op)")
        if flavour == Flavour.PLUGIN:
            notes.append("needs an implementation of moe_ir::FusedMoE (TensorRT plugin; on CPU: "
                         "moe_ir.backends.onnx.load_runner)")
        return BuildResult(files=files, notes=notes)


def _flavour(value: Flavour | str) -> Flavour:
    try:
        return Flavour(value)
    except ValueError:
        raise BackendError(f"unknown onnx flavour '{value}'; choose one of "
                           f"{', '.join(f.value for f in Flavour)}") from None


# ------------------------------------------------------------------------------------------------
# writing


def _embedded(lowered: LoweredModel, *, for_runtime: bool = False) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(lowered.model)
    for name, thunk in lowered.initializers.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(to_numpy(thunk()), name))
    return extensions.to_contrib_domain(model) if for_runtime else model


def write_model(lowered: LoweredModel, path: Path, *, external_data: bool, progress: Progress | None = None,
                for_runtime: bool = False) -> Path:
    """Write the model (and `<path>.data`), each through a temp file renamed into place; then check it.

    With external data the tensors stream into the data file one at a time, so memory holds at most one
    folded tensor beyond the caller's weights. The data file is renamed before the model, so a model file
    on disk always has its data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.ModelProto()
    model.CopyFrom(lowered.model)
    total = lowered.initializer_bytes()
    temps: list[str] = []
    try:
        data_tmp = None
        if external_data:
            data_path = path.with_name(path.name + ".data")
            fd, data_tmp = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=path.parent)
            temps.append(data_tmp)
            with os.fdopen(fd, "wb") as f:
                offset = 0
                for name, thunk in lowered.initializers.items():
                    arr = np.ascontiguousarray(to_numpy(thunk()))
                    tensor = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype),
                                              dims=arr.shape, data_location=onnx.TensorProto.EXTERNAL)
                    for key, value in (("location", data_path.name), ("offset", str(offset)),
                                       ("length", str(arr.nbytes))):
                        tensor.external_data.add(key=key, value=value)
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # bytes: bf16 has no buffer format
                    pad = -(offset + arr.nbytes) % _ALIGN
                    f.write(b"\0" * pad)
                    offset += arr.nbytes + pad
                    model.graph.initializer.append(tensor)
                    del arr
                    if progress is not None:
                        progress("weights", min(offset, total), total)
        else:
            done = 0
            for name, thunk in lowered.initializers.items():
                tensor = onnx.numpy_helper.from_array(to_numpy(thunk()), name)
                model.graph.initializer.append(tensor)
                done += len(tensor.raw_data)
                if progress is not None:
                    progress("weights", min(done, total), total)
        if for_runtime:
            model = extensions.to_contrib_domain(model)
        fd, model_tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        temps.append(model_tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        try:
            # Checked in the folder it will live in (external data resolves relative to the model).
            onnx.checker.check_model(model if not external_data else _without_data(model))
        except onnx.checker.ValidationError as err:
            raise BackendError(f"{path}: the lowered model fails onnx.checker: {err}") from None
        mode = 0o666 & ~_umask()  # mkstemp files are 0600; give them the mode a plain open() would
        for tmp in temps:
            os.chmod(tmp, mode)
        if data_tmp is not None:
            os.replace(data_tmp, path.with_name(path.name + ".data"))
        os.replace(model_tmp, path)
        temps.clear()
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if progress is not None:
        progress("done", total, total)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _without_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with external tensors as empty stubs: lets the checker run before the data is in place."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = b""
            del t.dims[:]
            t.dims.append(0)
    return out


# ------------------------------------------------------------------------------------------------
# running


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
    through onnxruntime-extensions, which needs it in memory (under 2 GiB)."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BackendError(f"{path}: not a readable ONNX model ({type(err).__name__}: {str(err)[:120]}); "
                           f"re-export it with `moe-ir build --backend onnx`") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    flavour = _flavour(meta.get("moe_ir.flavour", "portable"))
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
