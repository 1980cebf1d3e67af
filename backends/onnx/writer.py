"""Writing a lowered model to disk atomically: embedded weights, or external data streamed one tensor at a
time; each file through a temp file renamed into place, then checked by onnx.checker."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from moe_ir.errors import BackendError
from . import extensions
from .emit import to_numpy
from .weights import LoweredModel

# Above this many initializer bytes a model is written with external data (protobuf's hard limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
_ALIGN = 4096  # external tensors start on page boundaries so ONNX Runtime can map them

Progress = Callable[[str, int, int], None]  # (step, done, total): e.g. ("weights", bytes written, bytes)


def initializer_data(name: str, thunk) -> tuple[onnx.TensorProto, memoryview]:
    """An initializer's TensorProto (name, type, dims; no data) and its bytes as ONNX stores them: numpy's
    memory for every type but 4-bit ones, whose thunk returns them packed two a byte already."""
    four_bit = getattr(thunk, "four_bit", None)
    arr = np.ascontiguousarray(to_numpy(thunk()))
    if four_bit is not None:
        header = onnx.TensorProto(name=name, data_type=four_bit.elem_type, dims=four_bit.dims)
        if arr.dtype != np.uint8 or arr.size != -(-int(np.prod(four_bit.dims)) // 2):
            raise BackendError(f"initializer {name}: {arr.size} packed bytes for 4-bit dims {list(four_bit.dims)}")
    else:
        header = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(arr.dtype),
                                  dims=arr.shape)
    return header, memoryview(arr.reshape(-1).view(np.uint8))  # bytes: bf16 has no buffer format


def _embedded(name: str, thunk) -> onnx.TensorProto:
    tensor, data = initializer_data(name, thunk)
    tensor.raw_data = bytes(data)
    return tensor


def embedded_model(lowered: LoweredModel, *, for_runtime: bool = False) -> onnx.ModelProto:
    """The model with its initializers inside (for a session from bytes); `for_runtime`: rewritten for
    onnxruntime-extensions (a plugin-flavour model run on CPU)."""
    model = onnx.ModelProto()
    model.CopyFrom(lowered.model)
    for name, thunk in lowered.initializers.items():
        model.graph.initializer.append(_embedded(name, thunk))
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
                    tensor, data = initializer_data(name, thunk)
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", data_path.name), ("offset", str(offset)),
                                       ("length", str(data.nbytes))):
                        tensor.external_data.add(key=key, value=value)
                    f.write(data)
                    pad = -(offset + data.nbytes) % _ALIGN
                    f.write(b"\0" * pad)
                    offset += data.nbytes + pad
                    model.graph.initializer.append(tensor)
                    del data
                    if progress is not None:
                        progress("weights", min(offset, total), total)
        else:
            done = 0
            for name, thunk in lowered.initializers.items():
                tensor = _embedded(name, thunk)
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

