"""Reading an ONNX file that may come from elsewhere: its external-data locations confined to its folder.

An ONNX tensor can keep its bytes in another file, named by a `location` inside the model. Loaders
(onnx, ONNX Runtime, TensorRT's parser) open whatever that names, so an untrusted model could read
`../secret.bin`, `/proc/self/environ` or a device into its outputs, or block on a FIFO. Every moe-ir
loader of an ONNX file reads it through `load_model` (graph only, no weights), which refuses such a model
before anything else opens its data: one rule, `check_external_data`, for the runner, the plugin path,
the strict evaluator and the TensorRT engine build.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import onnx

from moe_ir.errors import BackendError
from ..integrity import confined_file, regular_file

# ONNX Runtime reads a location spelled like this as a raw memory address (its in-memory external data):
# from a file it would read the loading process's memory.
_ORT_MEMORY_TAG = "*/_ORT_MEM_ADDR_/*"


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    # Constant values and subgraphs (If/Loop/Scan bodies) carry tensors of their own.
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model a loader might fill from external data: initializers, sparse initializers,
    attribute tensors, in the main graph, its subgraphs, the model's local functions and training graphs."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)
    for training in model.training_info:
        yield from _graph_tensors(training.initialization)
        yield from _graph_tensors(training.algorithm)


def _count(value: str | None, key: str, where: str) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 20:
        raise BackendError(f"{where}: external-data {key} '{value[:40]}' is not a non-negative integer")
    return int(value)


def check_external_data(model: onnx.ModelProto, model_path: str | Path) -> None:
    """Refuse the model unless every external-data location names a regular file inside the model's folder
    (after symlinks), and its offset and length lie inside that file. The error names the tensor and the
    location. Nothing is opened: files are judged by their stat, so a FIFO or a device cannot block or be
    read."""
    folder = Path(model_path).parent
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.external_data:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        where = f"{model_path}: tensor '{tensor.name}'"
        location = entries.get("location")
        if location is None:
            raise BackendError(f"{where} stores its data externally but names no location")
        if location == _ORT_MEMORY_TAG or location.startswith("*/_ORT_MEM_ADDR_"):
            raise BackendError(f"{where}: external-data location '{location}' is ONNX Runtime's in-memory address "
                               f"tag, which a model file must not use")
        _, info = confined_file(folder, location, f"{where}: external data")
        offset = _count(entries.get("offset"), "offset", where) or 0
        length = _count(entries.get("length"), "length", where)
        end = offset + (length if length is not None else 0)
        if offset > info.st_size or end > info.st_size:
            raise BackendError(f"{where}: external data '{location}' bytes {offset}..{end} lie beyond the file's "
                               f"{info.st_size} bytes; the data file is truncated or not this model's")


def load_model(path: str | Path, what: str = "ONNX model") -> onnx.ModelProto:
    """The model at `path` without its external weights, after check_external_data: what every moe-ir
    loader reads first. External weights may then be loaded from the model's folder (onnx's
    load_external_data_for_model, ONNX Runtime or TensorRT given the path). Raises BackendError."""
    path = Path(path)
    if not path.exists():
        raise BackendError(f"{path}: no such {what} file")
    regular_file(path, what)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf's DecodeError and onnx's own errors
        raise BackendError(f"{path}: not a readable ONNX model ({type(err).__name__}: {str(err)[:120]}); "
                           f"re-export it with `moe-ir build --backend onnx`") from None
    check_external_data(model, path)
    return model
