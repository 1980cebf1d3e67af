"""Emission helpers of the ONNX lowering: the node emitter, ONNX/numpy types, and tensor conversion.

The emitter collects ONNX nodes and small constants and hands out unique tensor names. Names follow the
lowering's convention: the ONNX node that produces an IR value carries the IR node's name, helper nodes and
constants are named `<prefix>/<part>` where the prefix is the IR node being lowered, so every ONNX name maps
back to the IR node it came from by the text before the first '/'.

ONNX does not promote types: every constant is made in the type of the tensor it meets (`fconst`), and
where two types meet there is an explicit Cast (`cast`), placed where the reference semantics place it.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from moe_ir.ir import ElemType

OPSET = 18  # Split(num_outputs), ReduceMax with axes as input; ONNX Runtime, TensorRT and onnx 1.14+ take it
MS_DOMAIN = "com.microsoft"
CONTRIB_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops register in

ONNX_DTYPE = {ElemType.FLOAT32: TensorProto.FLOAT, ElemType.INT64: TensorProto.INT64,
              ElemType.FLOAT16: TensorProto.FLOAT16, ElemType.BFLOAT16: TensorProto.BFLOAT16,
              ElemType.FLOAT64: TensorProto.DOUBLE}
# numpy storage of each float type (numpy has no bfloat16; onnx reads and writes ml_dtypes' one)
NP_DTYPE = {ElemType.FLOAT32: np.float32, ElemType.FLOAT16: np.float16, ElemType.BFLOAT16: ml_dtypes.bfloat16,
            ElemType.FLOAT64: np.float64}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy (bfloat16 as ml_dtypes.bfloat16, which torch cannot hand over directly)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """Inverse of to_numpy."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # torch warns on read-only memory (e.g. onnx.reference's constants)
        a = a.copy()
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def dims(shape) -> list[int | str]:
    """An IR shape as ONNX value-info dims: ints stay, symbolic dims ("B", "S", "T") become their names."""
    return [d if isinstance(d, int) else str(d) for d in shape]


class Emitter:
    """Collects ONNX nodes and small constants; hands out unique tensor names under `prefix`."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, np.ndarray] = {}
        self._used: set[str] = set()
        self.prefix = ""

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        name = self._fresh(f"{self.prefix}/{hint}")
        self.constants[name] = np.asarray(value, dtype=dtype)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, *, out: list[str] | str | None = None,
           domain: str = "", name: str | None = None, **attrs) -> list[str] | str:
        """Append one node; returns its output name (a list when n_out > 1 or `out` is a list)."""
        if out is None:
            outs = [self._fresh(f"{self.prefix}/{op_type}") for _ in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
            self._used.update(outs)
        node_name = name or self._fresh(f"{self.prefix}/{op_type}#node")
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 and n_out == 1 and not isinstance(out, list) else outs

    # -- shapes ---------------------------------------------------------------------------------

    def rows_of(self, tensor: str) -> str:
        """[1] int64: the leading (dynamic) dimension of `tensor`."""
        return self.op("Shape", [tensor], start=0, end=1)

    def scalar(self, vec1: str) -> str:
        return self.op("Squeeze", [vec1])

    def zeros(self, shape: str, dtype=TensorProto.FLOAT, fill: float = 0.0) -> str:
        return self.op("ConstantOfShape", [shape], value=helper.make_tensor("v", dtype, [1], [fill]))

    # -- types ----------------------------------------------------------------------------------

    def fconst(self, value, dtype: ElemType, hint: str = "c") -> str:
        """A float constant in `dtype` (the type of the tensor it meets: ONNX does not promote)."""
        return self.const(value, NP_DTYPE[dtype], hint)

    def cast(self, tensor: str, src: ElemType, dst: ElemType) -> str:
        """`tensor` (of type src) as dst: an explicit Cast where the types differ, else the tensor."""
        if src == dst:
            return tensor
        return self.op("Cast", [tensor], to=ONNX_DTYPE[dst])
