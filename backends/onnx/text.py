"""A stable, readable text form of a lowered ONNX model, for golden tests and for reading a lowering.

One line per node, `%out, ... = [domain::]OpType<attrs>(%in, ...)  # node name`, after the graph's inputs,
outputs, weight initializers (name, dtype and shape; never values) and the small constants the emitter
made (integer ones with their values, float ones with up to 4 values). Metadata is listed except the
spec hash, which changes with the spec hash's definition, not with the lowering.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights import LoweredModel

_MAX_SHOWN = 8  # constants with more elements print their shape only


def lowered_text(lowered: LoweredModel) -> str:
    """The text form of `lowered`; calls each weight thunk once to read its dtype and shape."""
    model, g = lowered.model, lowered.model.graph
    lines = [f"model {g.name}  ir_version {model.ir_version}  opsets "
             + ", ".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import)]
    for prop in model.metadata_props:
        value = "<spec hash>" if prop.key == "moe_ir.spec_hash" else prop.value
        lines.append(f"  meta {prop.key} = {value}")
    lines += [f"  input  %{v.name}: {_value_type(v)}" for v in g.input]
    lines += [f"  output %{v.name}: {_value_type(v)}" for v in g.output]
    for name, thunk in lowered.initializers.items():
        four_bit = getattr(thunk, "four_bit", None)
        if four_bit is not None:  # packed two a byte: the ONNX type and logical shape
            elem = helper.tensor_dtype_to_string(four_bit.elem_type).removeprefix("TensorProto.").lower()
            lines.append(f"  weight %{name}: {elem}{list(four_bit.dims)}")
            continue
        t = thunk()
        lines.append(f"  weight %{name}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)}")
    for tensor in g.initializer:
        lines.append(f"  const  %{tensor.name}: {_const(numpy_helper.to_array(tensor))}")
    for node in g.node:
        outs = ", ".join(f"%{o}" for o in node.output)
        ins = ", ".join(f"%{i}" if i else "_" for i in node.input)
        op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        attrs = ", ".join(f"{a.name}={_attr(a)}" for a in node.attribute)
        lines.append(f"  {outs} = {op}{f'<{attrs}>' if attrs else ''}({ins})  # {node.name}")
    return "\n".join(lines) + "\n"


def _value_type(v: onnx.ValueInfoProto) -> str:
    t = v.type.tensor_type
    dims = [d.dim_param if d.dim_param else str(d.dim_value) for d in t.shape.dim]
    return f"{helper.tensor_dtype_to_np_dtype(t.elem_type).name}[{', '.join(dims)}]"


def _const(arr: np.ndarray) -> str:
    head = f"{arr.dtype.name}{list(arr.shape)}"
    if arr.size > _MAX_SHOWN or (arr.dtype.kind == "f" and arr.size > 4):
        return head
    values = [repr(float(x)) if arr.dtype.kind == "f" else str(int(x)) for x in arr.reshape(-1)]
    return f"{head} = {values[0] if arr.ndim == 0 else '[' + ', '.join(values) + ']'}"


def _attr(a: onnx.AttributeProto) -> str:
    value = helper.get_attribute_value(a)
    if isinstance(value, onnx.TensorProto):
        return _const(numpy_helper.to_array(value))
    if isinstance(value, bytes):
        return repr(value.decode())
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(repr(x) if isinstance(x, float) else str(x) for x in value) + "]"
    return str(value)
