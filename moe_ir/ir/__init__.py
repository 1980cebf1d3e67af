"""The moe-ir intermediate representation."""
from .graph import (LAYER_INPUT, LAYER_OUTPUT, MODEL_INPUT, MODEL_OUTPUT, Dim, ElemType, Graph, GraphKind, Node,
                    TensorType, Value, ValueKind)
from .ops import LossKind, OpCode, OpDef, WeightLayout, all_ops, op_def
from . import model_ops  # noqa: F401  (registers the whole-model ops)
from . import quant_ops  # noqa: F401  (registers dequantize)
from .printer import to_dot, to_text
from .serialize import from_json, to_json
from .verifier import verify

__all__ = ["LAYER_INPUT", "LAYER_OUTPUT", "MODEL_INPUT", "MODEL_OUTPUT", "Dim", "ElemType", "Graph", "GraphKind", "LossKind", "Node", "OpCode", "OpDef", "TensorType", "Value", "ValueKind",
           "WeightLayout", "all_ops", "from_json", "op_def", "to_dot", "to_json", "to_text", "verify"]
