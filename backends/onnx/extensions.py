"""CPU implementation of `moe_ir::FusedMoE` for ONNX Runtime, through onnxruntime-extensions.

onnxruntime-extensions runs Python custom ops only in the domain `ai.onnx.contrib`, so a plugin-flavour
model runs here with that node's domain rewritten (nothing else changes). The implementation is the
reference math of the fused_moe op (moe_ir.ir.ops), decoded from the node's integer/float attributes
exactly as the TensorRT plugin decodes its fields. It is slow (outputs cross into Python lists) and
meant for validation, not serving.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx
import torch

from ...ir import ElemType, OpCode, WeightLayout, op_def
from .lower import CONTRIB_DOMAIN
from .plugin_op import DOMAIN, OP_TYPE, FusedMoEAttrs


def fused_moe_reference(x: np.ndarray, w_router: np.ndarray, bias: np.ndarray, w_gate_up: np.ndarray,
                        w_down: np.ndarray, **fields) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The op's contract in numpy in/out: (out [T,H], expert_idx int32 [T,k], weights float32 [T,k])."""
    a = FusedMoEAttrs.decode(fields)
    gated = a.activation.gated
    attrs = {"score": a.score_fn, "k": a.top_k, "groups": a.n_group, "kept": a.topk_group,
             "group_score": a.group_score, "normalize": a.normalize, "scale": a.scale,
             "capacity_factor": None, "drop_rule": op_def(OpCode.FUSED_MOE).attrs["drop_rule"].default,
             "router_dtype": ElemType.FLOAT32, "activation": a.activation,
             "weight_layout": WeightLayout.GATE_UP_FUSED if gated else WeightLayout.SEPARATE}
    t = torch.from_numpy
    b = t(bias) if np.any(bias) else None  # zeros mean "no bias" in the contract; adding them is exact anyway
    with torch.no_grad():
        out, idx, w = op_def(OpCode.FUSED_MOE).reference(attrs, t(x), t(w_router), b, t(w_gate_up), t(w_down),
                                                         None, None, None, None)
    return out.numpy(), idx.to(torch.int32).numpy(), w.to(torch.float32).numpy()


@functools.cache
def register() -> str:
    """Register the Python op once per process; returns the custom-op library path for SessionOptions."""
    from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op

    f, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64
    fields = {"score_fn": i64, "top_k": i64, "n_group": i64, "topk_group": i64, "group_score": i64,
              "normalize": i64, "scale": f, "activation": i64}
    onnx_op(op_type=OP_TYPE, inputs=[f] * 5, outputs=[f, PyCustomOpDef.dt_int32, f], attrs=fields)(
        fused_moe_reference)
    return get_library_path()


def to_contrib_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin-flavour model whose FusedMoE nodes sit in the extensions' domain."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            node.domain = CONTRIB_DOMAIN
    opsets = [o for o in out.opset_import if o.domain != DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(opsets + [onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1)])
    return out
