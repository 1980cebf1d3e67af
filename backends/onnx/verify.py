"""Checking an exported model without ONNX Runtime, for the f16/bf16 files its CPU provider cannot run.

  * `register_fused_moe_schema()`: ONNX schemas for `moe_ir::FusedMoE` and `moe_ir::QFusedMoE` (types and
    shapes of the plugin_op.py contract), so `onnx.shape_inference.infer_shapes(strict_mode=True)` checks the types
    of the whole plugin graph, the plugin node's inputs included, instead of stopping at an unknown op;
  * `evaluate(model, x)`: the model run by onnx's reference evaluator (`onnx.reference`, numpy; bfloat16
    through ml_dtypes) with a Python `moe_ir::FusedMoE`. Slow; for small test layers.

The evaluator computes each op in the model's types (bf16 Gemm in bfloat16 storage), so it checks that a
low-precision export means the same as the IR up to that precision, which ONNX Runtime on CPU cannot.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto

from . import plugin_op
from .extensions import fused_moe_torch, qfused_moe_torch
from .emit import from_numpy, to_numpy
from .external_data import load_model

_ATTRIBUTES = ("score_fn", "top_k", "n_group", "topk_group", "group_score", "normalize", "scale", "activation")
_LOW_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")


@functools.cache
def register_fused_moe_schema() -> None:
    """Register the contract's schema with onnx (once per process; onnx's registry is global)."""
    from onnx.defs import OpSchema

    def param(name: str, type_str: str, doc: str) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, type_str, doc)

    attr_types = {k: OpSchema.AttrType.FLOAT if k == "scale" else OpSchema.AttrType.INT for k in _ATTRIBUTES}
    schema = OpSchema(
        plugin_op.OP_TYPE, plugin_op.DOMAIN, 1, doc="moe-ir's fused routed-experts op (backends/onnx/plugin_op.py)",
        inputs=[param("x", "T", "[T, H] activations"), param("w_router", "tensor(float)", "[E, H]"),
                param("bias", "tensor(float)", "[E]"), param("w_gate_up", "T", "[E, 2F or F, H]"),
                param("w_down", "T", "[E, H, F]")],
        outputs=[param("out", "T", "[T, H]"), param("expert_idx", "tensor(int32)", "[T, k]"),
                 param("weights", "tensor(float)", "[T, k]")],
        type_constraints=[("T", _LOW_TYPES, "activation and expert weight type")],
        attributes=[OpSchema.Attribute(k, t, "") for k, t in attr_types.items()],
    )
    schema.set_type_and_shape_inference_function(_infer_fused_moe)
    onnx.defs.register_schema(schema)
    # QFusedMoE: the same outputs and attributes, the stored parts of the expert weights as inputs
    parts = [param(name, "tensor(float)" if name.endswith("scales") else "tensor(int8)", "stored part")
             for name in plugin_op.QUANT_INPUT_NAMES[3:]]
    quant = OpSchema(
        plugin_op.QUANT_OP_TYPE, plugin_op.DOMAIN, 1, doc="moe-ir's fused routed-experts op on quantized experts",
        inputs=[param("x", "T", "[T, H] activations"), param("w_router", "tensor(float)", "[E, H]"),
                param("bias", "tensor(float)", "[E]"), *parts],
        outputs=[param("out", "T", "[T, H]"), param("expert_idx", "tensor(int32)", "[T, k]"),
                 param("weights", "tensor(float)", "[T, k]")],
        type_constraints=[("T", _LOW_TYPES, "activation type")],
        attributes=[OpSchema.Attribute(k, t, "") for k, t in attr_types.items()] +
                   [OpSchema.Attribute(k, OpSchema.AttrType.INT, "") for k in plugin_op.QUANT_ATTRIBUTE_NAMES],
    )
    quant.set_type_and_shape_inference_function(_infer_fused_moe)
    onnx.defs.register_schema(quant)


def _infer_fused_moe(ctx) -> None:
    x = ctx.get_input_type(0).tensor_type
    top_k = ctx.get_attribute("top_k").i
    rows = x.shape.dim[0] if x.HasField("shape") and len(x.shape.dim) == 2 else None
    hidden = x.shape.dim[1] if rows is not None else None

    def out_type(elem: int, dims) -> onnx.TypeProto:
        t = onnx.TypeProto()
        t.tensor_type.elem_type = elem
        if rows is not None:
            for d in dims:
                t.tensor_type.shape.dim.add().CopyFrom(d)
        return t

    k_dim = onnx.TensorShapeProto.Dimension(dim_value=top_k)
    ctx.set_output_type(0, out_type(x.elem_type, [rows, hidden]))
    ctx.set_output_type(1, out_type(TensorProto.INT32, [rows, k_dim]))
    ctx.set_output_type(2, out_type(TensorProto.FLOAT, [rows, k_dim]))


def infer_strict(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's type and shape inference in strict mode (raises on any inconsistency), with the plugin's
    schema registered."""
    register_fused_moe_schema()
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def _fused_moe_op_run():
    from onnx.reference.op_run import OpRun

    class FusedMoE(OpRun):
        op_domain = plugin_op.DOMAIN

        def _run(self, x, w_router, bias, w_gate_up, w_down, score_fn=None, top_k=None, n_group=None,
                 topk_group=None, group_score=None, normalize=None, scale=None, activation=None):
            fields = dict(score_fn=score_fn, top_k=top_k, n_group=n_group, topk_group=topk_group,
                          group_score=group_score, normalize=normalize, scale=scale, activation=activation)
            out, idx, w = fused_moe_torch(*(from_numpy(a) for a in (x, w_router, bias, w_gate_up, w_down)),
                                          **fields)
            return to_numpy(out), idx.numpy(), w.numpy()

    class QFusedMoE(OpRun):
        op_domain = plugin_op.DOMAIN

        def _run(self, x, w_router, bias, gu_codes, gu_scales, gu_zeros, d_codes, d_scales, d_zeros, score_fn=None,
                 top_k=None, n_group=None, topk_group=None, group_score=None, normalize=None, scale=None,
                 activation=None, quant_format=None, bits=None, block=None, symmetric=None):
            fields = dict(score_fn=score_fn, top_k=top_k, n_group=n_group, topk_group=topk_group,
                          group_score=group_score, normalize=normalize, scale=scale, activation=activation,
                          quant_format=quant_format, bits=bits, block=block, symmetric=symmetric)
            parts = (gu_codes, gu_scales, gu_zeros, d_codes, d_scales, d_zeros)
            out, idx, w = qfused_moe_torch(*(from_numpy(a) for a in (x, w_router, bias)),
                                           *(torch.from_numpy(np.array(p)) for p in parts), **fields)  # writable
            return to_numpy(out), idx.numpy(), w.numpy()

    return FusedMoE, QFusedMoE


def evaluate(model: onnx.ModelProto | str, x: torch.Tensor) -> Mapping[str, torch.Tensor]:
    """Outputs by name of `model` (any flavour but ort) on x [B,S,H], x cast to the model's input type."""
    from onnx.reference import ReferenceEvaluator

    if isinstance(model, str):
        proto = load_model(model)  # external data confined to the model's folder, then read
        onnx.load_external_data_for_model(proto, str(Path(model).parent))
    else:
        proto = model
    x_info = next(i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer})
    elem = x_info.type.tensor_type.elem_type
    dtype = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
             TensorProto.BFLOAT16: torch.bfloat16}[elem]
    session = ReferenceEvaluator(proto, new_ops=list(_fused_moe_op_run()))
    results = session.run(None, {x_info.name: to_numpy(x.detach().to(dtype))})
    return {o.name: from_numpy(np.asarray(r)) for o, r in zip(proto.graph.output, results)}
