"""CPU implementation of `moe_ir::FusedMoE` for ONNX Runtime, through onnxruntime-extensions.

onnxruntime-extensions runs Python custom ops only in the domain `ai.onnx.contrib`, so a plugin-flavour
model runs here with that node's domain rewritten. Its Python ops take float32 only (a float16 signature
aborts the process inside the extensions library, and bfloat16 has no numpy type), so in an f16/bf16
model the runtime copy also casts the node's low-precision inputs to float32 and its output back: the
op then computes in float32, which is what the reference interpreter does too. The implementation is the
reference math of the fused_moe op (moe_ir.ir.ops), decoded from the node's integer/float attributes
exactly as the TensorRT plugin decodes its fields. It is slow (outputs cross into Python lists) and
meant for validation, not serving.

`moe_ir::QFusedMoE` (quantized experts) runs the same reference math on `QuantizedExperts`: stacked stored
parts that dequantize one expert when the math indexes it (the IR's DEQUANTIZE of that expert's slice), so
no float copy of every expert is made.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import torch
from onnx import TensorProto

from moe_ir.errors import BackendError
from moe_ir.ir import ElemType, OpCode, WeightLayout, op_def
from moe_ir.ir.quant_ops import dequantize
from moe_ir.spec import QuantFormat
from .emit import CONTRIB_DOMAIN
from .plugin_op import (DOMAIN, OP_TYPE, QUANT_INPUT_NAMES, QUANT_OP_TYPE, QUANT_PLUGIN_NAME, FusedMoEAttrs,
                        QuantAttrs, check_quantized_shapes)

_OP_TYPES = (OP_TYPE, QUANT_OP_TYPE)


class QuantizedExperts:
    """A stacked [E, N, K] quantized expert weight given by its stored parts as the contract passes them (codes
    and zero points as int8 bytes); indexing expert e dequantizes that expert alone, in `dtype`."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, quant: QuantAttrs,
                 dtype: torch.dtype):
        signed = quant.format == QuantFormat.INT8 and quant.symmetric  # the IR stores only these codes as int8
        self.codes = codes if signed else codes.view(torch.uint8)
        self.scales = scales
        self.zeros = None if quant.symmetric else zeros.view(torch.uint8)
        self.quant, self.dtype = quant, dtype
        experts, rows, stored = codes.shape
        self.shape = torch.Size((experts, rows, stored * 8 // quant.bits))

    def __getitem__(self, e: int) -> torch.Tensor:
        zeros = None if self.zeros is None else self.zeros[e]
        return dequantize(self.codes[e], self.scales[e], zeros, self.quant.format, self.quant.block).to(self.dtype)


def qfused_moe_torch(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, *parts: torch.Tensor,
                     **fields) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QFusedMoE on torch tensors: `parts` are the six stored-part inputs in QUANT_INPUT_NAMES order; the
    shapes are checked against the attributes first (a BackendError naming the input)."""
    quant = QuantAttrs.decode(fields)
    a = FusedMoEAttrs.decode(fields)
    if len(parts) != 6:
        raise BackendError(f"{QUANT_PLUGIN_NAME} takes {len(QUANT_INPUT_NAMES)} inputs, got {3 + len(parts)}")
    shapes = dict(zip(QUANT_INPUT_NAMES, (t.shape for t in (x, w_router, bias, *parts))))
    check_quantized_shapes(shapes, quant, a.activation.gated)
    for name, t in zip(QUANT_INPUT_NAMES[3:], parts):
        if ("scales" in name) != t.dtype.is_floating_point or (not t.dtype.is_floating_point and t.dtype != torch.int8):
            raise BackendError(f"{QUANT_PLUGIN_NAME}: input {name} is {str(t.dtype).removeprefix('torch.')}, expected "
                               f"{'float32' if 'scales' in name else 'int8'}")
    gate_up = QuantizedExperts(*parts[:3], quant, x.dtype)
    down = QuantizedExperts(*parts[3:], quant, x.dtype)
    return fused_moe_torch(x, w_router, bias, gate_up, down, **fields)


def fused_moe_torch(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor, **fields) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's contract on torch tensors, each computed in the type it comes in (router in float32,
    experts in x's type): (out [T,H] x's type, expert_idx int32 [T,k], weights float32 [T,k])."""
    a = FusedMoEAttrs.decode(fields)
    gated = a.activation.gated
    attrs = {"score": a.score_fn, "k": a.top_k, "groups": a.n_group, "kept": a.topk_group,
             "group_score": a.group_score, "normalize": a.normalize, "scale": a.scale,
             "capacity_factor": None, "drop_rule": op_def(OpCode.FUSED_MOE).attrs["drop_rule"].default,
             "router_dtype": ElemType.FLOAT32, "activation": a.activation,
             "weight_layout": WeightLayout.GATE_UP_FUSED if gated else WeightLayout.SEPARATE}
    b = bias if bool(bias.any()) else None  # zeros mean "no bias" in the contract; adding them is exact anyway
    with torch.no_grad():
        out, idx, w = op_def(OpCode.FUSED_MOE).reference(attrs, x, w_router, b, w_gate_up, w_down,
                                                         None, None, None, None)
    return out, idx.to(torch.int32), w.to(torch.float32)


def fused_moe_reference(x: np.ndarray, w_router: np.ndarray, bias: np.ndarray, w_gate_up: np.ndarray,
                        w_down: np.ndarray, **fields) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's contract in numpy in/out: (out [T,H], expert_idx int32 [T,k], weights float32 [T,k])."""
    t = torch.from_numpy
    out, idx, w = fused_moe_torch(t(x), t(w_router), t(bias), t(w_gate_up), t(w_down), **fields)
    return out.numpy(), idx.numpy(), w.numpy()


def qfused_moe_reference(x: np.ndarray, w_router: np.ndarray, bias: np.ndarray, *parts: np.ndarray,
                         **fields) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QFusedMoE in numpy in/out (the onnxruntime-extensions op)."""
    t = torch.from_numpy
    out, idx, w = qfused_moe_torch(t(x), t(w_router), t(bias), *(t(np.ascontiguousarray(p)) for p in parts),
                                   **fields)
    return out.numpy(), idx.numpy(), w.numpy()


@functools.cache
def register() -> str:
    """Register the Python ops once per process; returns the custom-op library path for SessionOptions."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f, i8, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int64
    fields = {"score_fn": i64, "top_k": i64, "n_group": i64, "topk_group": i64, "group_score": i64,
              "normalize": i64, "scale": f, "activation": i64}
    outputs = [f, PyCustomOpDef.dt_int32, f]
    onnx_op(op_type=OP_TYPE, inputs=[f] * 5, outputs=outputs, attrs=fields)(fused_moe_reference)
    quant_fields = dict(fields, quant_format=i64, bits=i64, block=i64, symmetric=i64)
    onnx_op(op_type=QUANT_OP_TYPE, inputs=[f, f, f, i8, f, i8, i8, f, i8], outputs=outputs, attrs=quant_fields)(
        qfused_moe_reference)
    return get_library_path()


def check_plugin_nodes(model: onnx.ModelProto) -> None:
    """Decode every FusedMoE/QFusedMoE node's attributes and check a QFusedMoE's stored-part shapes against
    them, before a session runs the file: an exception inside the extensions' Python op aborts the process,
    so a malformed contract must be refused here, as a BackendError naming the node and what is wrong."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            dims[node.output[0]] = tuple(node.attribute[0].t.dims)
    for node in model.graph.node:
        if node.domain not in (DOMAIN, CONTRIB_DOMAIN) or node.op_type not in _OP_TYPES:
            continue
        fields = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            attrs = FusedMoEAttrs.decode(fields)
            if node.op_type == QUANT_OP_TYPE:
                quant = QuantAttrs.decode(fields)
                if len(node.input) != len(QUANT_INPUT_NAMES):
                    raise BackendError(f"{QUANT_PLUGIN_NAME} takes {len(QUANT_INPUT_NAMES)} inputs, got "
                                       f"{len(node.input)}")
                shapes = {name: dims.get(value, ()) for name, value in zip(QUANT_INPUT_NAMES, node.input)}
                shapes["x"] = ("T", shapes["w_router"][1] if len(shapes["w_router"]) == 2 else "H")
                check_quantized_shapes(shapes, quant, attrs.activation.gated)
        except BackendError as err:
            raise BackendError(f"node {node.name}: {err}") from None


def to_contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-flavour model whose FusedMoE nodes sit in the extensions' domain, with float32
    inputs and outputs (Casts around them where the model's types are f16/bf16). The plugin nodes' contracts
    are checked first (check_plugin_nodes)."""
    check_plugin_nodes(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = _tensor_types(out)
    nodes = []
    for node in out.graph.node:
        if node.domain != DOMAIN or node.op_type not in _OP_TYPES:
            nodes.append(node)
            continue
        node.domain = CONTRIB_DOMAIN
        x_type = types.get(node.input[0], TensorProto.FLOAT)
        for i, name in enumerate(node.input):
            if types.get(name, TensorProto.FLOAT) in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                cast = f"{node.name}/runtime_f32_in{i}"
                nodes.append(onnx.helper.make_node("Cast", [name], [cast], name=cast, to=TensorProto.FLOAT))
                node.input[i] = cast
        nodes.append(node)
        if x_type != TensorProto.FLOAT:  # output 0 has x's type in the contract
            real, node.output[0] = node.output[0], f"{node.name}/runtime_f32_out0"
            nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [real], name=f"{node.name}/runtime_out0",
                                               to=x_type))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    opsets = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return out


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """ONNX element type of the initializers and graph inputs, and of the FusedMoE node's x: that is the
    activation input reshaped to tokens, so it has the activation input's type (no shape inference,
    which would copy a model of up to 2 GiB)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    activation = [v for v in model.graph.input if v.name not in types]
    types.update({v.name: v.type.tensor_type.elem_type for v in model.graph.input})
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in _OP_TYPES and node.input[0] not in types and activation:
            types[node.input[0]] = activation[0].type.tensor_type.elem_type
    return types
