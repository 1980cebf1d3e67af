"""Lowering of the MoE layer ops to standard ONNX (opset 18): the portable flavour's MoE, which the other
flavours inherit and override where they differ (flavours.py).

Routing with TopK/GatherElements/ScatterElements. Dispatch is a stable sort of the T*k assignments by
expert, done with TopK(largest=0) on the unique int64 key `expert * A + assignment` (ONNX TopK has no
stable sort of equal keys, unique keys make it unnecessary). Capacity dropping follows the reference
(score or position rule).

Expert FFNs are unrolled per expert: Split the gathered rows by the dynamic group sizes (plus one trailing
group of dropped rows), one Gemm chain per expert, Concat back. Each expert's weights are their own
initializers, named `<stacked weight>[e]` (e.g. `experts.w_down[3]`), sliced at export: a Gather on the
stacked initializer would either copy the expert's weights on every run or, folded by ONNX Runtime at
session creation, take minutes and twice the memory for a 2 GB layer (measured: 286 s to load). Unrolled
rather than Loop because every slice keeps a static weight and a dynamic row count, which ONNX Runtime
runs with no per-run copies; at 256 experts this is ~2.5k nodes, which loads in seconds.

Combine regroups the weighted rows by token (a stable sort) and sums each token's k rows with ReduceSum
(expert choice: differences of a float64 running sum), never ScatterND with reduction=add, which ONNX
Runtime's CPU kernel computes racily on duplicate indices. Expert-choice routing is TopK over tokens per
expert with a dynamic k. Nothing builds a tokens x experts x hidden tensor.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from moe_ir.ir import ElemType, Node, OpCode, Value, WeightLayout
from moe_ir.spec import Activation, DropRule, GroupScore, ScoreFn
from .emit import ONNX_DTYPE
from .lowering import Lowering


def rows_per_token(combine: Node) -> int | None:
    """k when every token owns exactly k of the combined rows (token-choice dispatch), else None."""
    dispatch = combine.inputs[1].producer
    if dispatch is not None and dispatch.op == OpCode.DISPATCH:
        return int(dispatch.inputs[0].type.shape[1])
    return None


class MoeOps(Lowering):
    """`_lower_<op>` for the ops of an MoE layer."""

    def _lower_flatten_tokens(self, node: Node) -> None:
        h = node.outputs[0].type.shape[1]
        self.em.op("Reshape", [self.operand(node.inputs[0]), self.em.const([-1, h])], out=node.outputs[0].name,
                   name=node.name)

    def _lower_restore_tokens(self, node: Node) -> None:
        y, like = node.inputs
        lead = self.em.op("Shape", [self.operand(like)], start=0, end=2)
        shape = self.em.op("Concat", [lead, self.em.const([y.type.shape[1]])], axis=0)
        # allowzero: an empty batch (B or S = 0) puts a 0 in `shape`, which Reshape would otherwise read as
        # "copy this dim from the input" ([0, H] -> [1, H, H] for x [1, 0, H]) and fail.
        self.em.op("Reshape", [self.operand(y), shape], out=node.outputs[0].name, name=node.name, allowzero=1)

    def _lower_linear(self, node: Node) -> None:
        # Computed in out_dtype (the router's): the activation is cast to it first, as the reference does.
        dt = node.attrs["out_dtype"]
        ins = [self.cast_operand(v, dt) for v in node.inputs if v is not None]
        self.em.op("Gemm", ins, out=node.outputs[0].name, name=node.name, transB=1)

    def _lower_router_noise(self, node: Node) -> None:
        # Noise is a training-time perturbation; an inference export is the identity (as the reference).
        self.em.op("Identity", [self.operand(node.inputs[0])], out=node.outputs[0].name, name=node.name)

    def _lower_score(self, node: Node) -> None:
        op = "Softmax" if node.attrs["fn"] == ScoreFn.SOFTMAX else "Sigmoid"
        kw = {"axis": -1} if op == "Softmax" else {}
        self.em.op(op, [self.operand(node.inputs[0])], out=node.outputs[0].name, name=node.name, **kw)

    def _lower_topk_route(self, node: Node) -> None:
        em, a = self.em, node.attrs
        scores, bias = node.inputs
        scores_n = self.operand(scores)
        # Selection on float32 (scores + a float32 bias promote to it in the reference too).
        select = self.as_float32(scores)
        if bias is not None:
            select = em.op("Add", [select, self.as_float32(bias)])
        e = scores.type.shape[1]
        if a["groups"] > 1:
            groups = a["groups"]
            grouped = em.op("Reshape", [select, em.const([0, groups, e // groups])])
            if a["group_score"] == GroupScore.MAX:
                gscore = em.op("ReduceMax", [grouped, em.const([-1])], keepdims=0)
            else:
                top2 = em.op("TopK", [grouped, em.const([2])], 2, axis=-1)[0]
                gscore = em.op("ReduceSum", [top2, em.const([-1])], keepdims=0)
            keep = em.op("TopK", [gscore, em.const([a["kept"]])], 2, axis=-1)[1]
            ones = em.op("ConstantOfShape", [em.op("Shape", [keep])],
                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]))
            mask = em.op("ScatterElements", [em.zeros(em.op("Shape", [gscore])), keep, ones], axis=1)
            keep_mask = em.op("Cast", [em.op("Unsqueeze", [mask, em.const([-1])])], to=TensorProto.BOOL)
            # -inf, not 0: a biased score can be negative and must still lose to every kept expert.
            masked = em.op("Where", [keep_mask, grouped, em.const(-np.inf, np.float32, "neg_inf")])
            select = em.op("Reshape", [masked, em.const([0, e])])
        idx = em.op("TopK", [select, em.const([a["k"]])], 2, axis=-1, largest=1, sorted=1)[1]
        em.op("Identity", [idx], out=node.outputs[0].name, name=node.name)
        em.op("GatherElements", [scores_n, idx], out=node.outputs[1].name, axis=1)  # weights in the scores' type

    def _lower_sparsemixer_route(self, node: Node) -> None:
        # The reference's k sequential picks, unrolled: ArgMax (first of equal logits, as torch's max on CPU),
        # the relative-gap mask against the original logits, a softmax over the unpicked experts.
        em, a = self.em, node.attrs
        dt = node.inputs[0].type.dtype
        logits = self.operand(node.inputs[0])
        neg_inf = em.fconst(-np.inf, dt, "neg_inf")
        magnitude = em.op("Abs", [logits])
        limit = em.fconst(2 * a["eps"], dt, "gap_limit")
        remaining = logits
        picks, weights = [], []
        for j in range(a["k"]):
            top = em.op("ReduceMax", [remaining, em.const([-1])], keepdims=1)
            idx = em.op("ArgMax", [remaining], axis=-1, keepdims=1)
            gap = em.op("Div", [em.op("Sub", [top, logits]), em.op("Max", [magnitude, top])])
            gates = em.op("Softmax", [em.op("Where", [em.op("Greater", [gap, limit]), neg_inf, remaining])], axis=-1)
            picks.append(idx)
            weights.append(em.op("GatherElements", [gates, idx], axis=1))
            if j + 1 < a["k"]:
                fill = em.op("Expand", [neg_inf, em.op("Shape", [idx])])
                remaining = em.op("ScatterElements", [remaining, idx, fill], axis=1)
        em.op("Concat", picks, out=node.outputs[0].name, name=node.name, axis=1)
        em.op("Concat", weights, out=node.outputs[1].name, axis=1)

    def _lower_scale_weights(self, node: Node) -> None:
        em, a = self.em, node.attrs
        w = self.operand(node.inputs[0])
        dt = node.inputs[0].type.dtype
        if a["normalize"]:
            total = em.op("ReduceSum", [w, em.const([-1])], keepdims=1)
            w = em.op("Div", [w, em.op("Add", [total, em.fconst(1e-20, dt)])])
        em.op("Mul", [w, em.fconst(a["scale"], dt, "scale")], out=node.outputs[0].name, name=node.name)

    def _lower_dispatch(self, node: Node) -> None:
        em, a = self.em, node.attrs
        idx, w = (self.operand(v) for v in node.inputs)
        k = node.inputs[0].type.shape[1]
        n_exp = a["num_experts"]
        flat_e = em.op("Reshape", [idx, em.const([-1])])
        flat_w = em.op("Reshape", [w, em.const([-1])])
        n_assign = em.op("Shape", [flat_e])                   # [1]: A = T*k
        n_assign_s = em.scalar(n_assign)
        arange = em.op("Range", [em.const(0), n_assign_s, em.const(1)])

        def sort_by(key: str) -> str:
            """Permutation sorting int64 `key` ascending; keys are unique, so the order is total."""
            return em.op("TopK", [key, n_assign], 2, axis=0, largest=0, sorted=1)[1]

        def unique_key(major: str, minor: str) -> str:
            return em.op("Add", [em.op("Mul", [major, n_assign_s]), minor])

        if a["capacity_factor"] is None:
            key = flat_e
            kept_sorted = None
            order = sort_by(unique_key(flat_e, arange))
        else:
            if a["drop_rule"] == DropRule.POSITION:
                # GShard priority: slot-major, then token: rank of assignment t*k+j is j*T + t.
                n_tok = em.op("Div", [n_assign_s, em.const(k)])
                rank = em.op("Add", [em.op("Mul", [em.op("Mod", [arange, em.const(k)]), n_tok]),
                                     em.op("Div", [arange, em.const(k)])])
                by_priority = sort_by(unique_key(flat_e, rank))
            else:
                # Highest weight first within each expert (TopK keeps lower indices first on ties,
                # the reference's stable order), then regroup by expert keeping that order.
                by_weight = em.op("TopK", [flat_w, n_assign], 2, axis=0, largest=1, sorted=1)[1]
                regroup = sort_by(unique_key(em.op("Gather", [flat_e, by_weight]), arange))
                by_priority = em.op("Gather", [by_weight, regroup])
            capacity = self._capacity(n_assign, a["capacity_factor"], n_exp)
            sorted_e = em.op("Gather", [flat_e, by_priority])
            counts = self._bincount(flat_e, n_assign, n_exp)
            starts = em.op("CumSum", [counts, em.const(0)], exclusive=1)
            position = em.op("Sub", [arange, em.op("Gather", [starts, sorted_e])])
            kept_by_priority = em.op("Cast", [em.op("Less", [position, capacity])], to=TensorProto.INT64)
            kept = em.op("ScatterElements", [em.zeros(n_assign, TensorProto.INT64), by_priority, kept_by_priority],
                         axis=0)
            kept_b = em.op("Cast", [kept], to=TensorProto.BOOL)
            # Dropped assignments sort after every expert's group (key E), as in the reference.
            key = em.op("Where", [kept_b, flat_e, em.const(n_exp)])
            order = sort_by(unique_key(key, arange))
            kept_sorted = em.op("Gather", [kept_b, order])
        em.op("Div", [order, em.const(k)], out=node.outputs[0].name, name=node.name)
        row_w = em.op("Gather", [flat_w, order])
        if kept_sorted is not None:
            row_w = em.op("Where", [kept_sorted, row_w, em.fconst(0.0, node.inputs[1].type.dtype)])
        em.op("Identity", [row_w], out=node.outputs[1].name)
        sizes = self._bincount(key, n_assign, n_exp + 1)
        em.op("Slice", [sizes, em.const([0]), em.const([n_exp])], out=node.outputs[2].name)

    def _capacity(self, n_assign: str, factor: float, n_exp: int) -> str:
        """[1] int64: max(1, ceil(factor * A / E)) for A assignments ([1] int64) over E experts, in double
        as the reference computes it. The one statement of the capacity rule in the ONNX lowering: dispatch
        with dropping and expert-choice routing both use it."""
        em = self.em
        a = em.op("Cast", [n_assign], to=TensorProto.DOUBLE)
        cap = em.op("Ceil", [em.op("Div", [em.op("Mul", [a, em.const(factor, np.float64)]),
                                           em.const(float(n_exp), np.float64)])])
        return em.op("Max", [em.op("Cast", [cap], to=TensorProto.INT64), em.const([1])])

    def _bincount(self, keys: str, n_assign: str, length: int) -> str:
        em = self.em
        ones = em.op("ConstantOfShape", [n_assign], value=helper.make_tensor("v", TensorProto.INT64, [1], [1]))
        return em.op("ScatterElements", [em.zeros(em.const([length]), TensorProto.INT64), keys, ones], axis=0,
                     reduction="add")

    def _lower_expert_choice_route(self, node: Node) -> None:
        em, a = self.em, node.attrs
        scores = self.as_float32(node.inputs[0])
        n_exp = node.inputs[0].type.shape[1]
        n_tok = em.rows_of(scores)
        # Each expert takes capacity(T*k) tokens, at most all T of them.
        assignments = em.op("Mul", [n_tok, em.const([a["top_k"]])])
        cap = em.op("Min", [self._capacity(assignments, a["capacity_factor"], n_exp), n_tok])
        by_expert = em.op("Transpose", [scores], perm=[1, 0])
        values, tokens = em.op("TopK", [by_expert, cap], 2, axis=-1, largest=1, sorted=1)
        em.op("Reshape", [tokens, em.const([-1])], out=node.outputs[0].name, name=node.name)
        values = em.cast(values, ElemType.FLOAT32, node.outputs[1].type.dtype)  # exact: they came from it
        em.op("Reshape", [values, em.const([-1])], out=node.outputs[1].name)
        em.op("Expand", [cap, em.const([n_exp])], out=node.outputs[2].name)

    def _ffn(self, x: str, node: Node, w: dict[str, str | None], out: str | None = None) -> str:
        """One FFN on rows `x` with [F,H]/[H,F] weights (names of tensors; None = absent)."""
        em = self.em
        act = node.attrs["activation"]
        fused = act.gated and node.attrs["weight_layout"] == WeightLayout.GATE_UP_FUSED

        def linear(inp: str, weight: str, bias: str | None) -> str:
            return self.matmul_transposed(inp, weight, bias)

        if fused:
            gate, up = em.op("Split", [linear(x, w["w_up"], w["b_up"])], 2, axis=1, num_outputs=2)
        else:
            up = linear(x, w["w_up"], w["b_up"])
            gate = linear(x, w["w_gate"], w["b_gate"]) if act.gated else None
        dt = node.inputs[0].type.dtype
        if act == Activation.CLAMPED_SWIGLU:
            a = node.attrs
            limit = em.fconst(a["clamp_limit"], dt, "clamp_limit")
            gate = em.op("Min", [gate, limit])
            up = em.op("Max", [em.op("Min", [up, limit]), em.fconst(-a["clamp_limit"], dt, "clamp_floor")])
            alpha = em.fconst(a["clamp_alpha"], dt, "alpha")
            glu = em.op("Mul", [gate, em.op("Sigmoid", [em.op("Mul", [gate, alpha])])])
            hidden = em.op("Mul", [glu, em.op("Add", [up, em.fconst(1.0, dt, "one")])])
        elif act == Activation.SWIGLU:
            hidden = em.op("Mul", [em.op("Mul", [gate, em.op("Sigmoid", [gate])]), up])
        elif act == Activation.GEGLU:
            hidden = em.op("Mul", [self._gelu(gate, dt), up])
        elif act == Activation.GELU:
            hidden = self._gelu(up, dt)
        else:
            hidden = em.op("Relu", [up])
        return self.matmul_transposed(hidden, w["w_down"], w["b_down"], out=out)

    def _gelu(self, x: str, dt: ElemType) -> str:
        # Erf form: the spec's GELU is PyTorch's exact one (opset 20's Gelu would pin a newer opset).
        em = self.em
        erf = em.op("Erf", [em.op("Mul", [x, em.fconst(1 / math.sqrt(2), dt)])])
        return em.op("Mul", [em.op("Mul", [x, em.fconst(0.5, dt)]), em.op("Add", [erf, em.fconst(1.0, dt)])])

    def matmul_transposed(self, x: str, weight: str, bias: str | None, out: str | None = None) -> str:
        """x @ weight.T (+ bias) for a [N, K] weight (quant_ops.py lowers quantized weights its own way)."""
        return self.em.op("Gemm", [x, weight] + ([bias] if bias else []), transB=1, **({"out": out} if out else {}))

    def expert_weight(self, value: Value, e: int) -> str:
        """Expert e's slice of a stacked expert weight (an initializer; quant_ops.py lowers quantized ones)."""
        return self.inits.expert_slice(value, e)

    def _weight_operands(self, node: Node) -> dict[str, Value | None]:
        return {k: node.input(k) for k in ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")}

    def _lower_ffn(self, node: Node) -> None:
        w = {k: (self.operand(v) if v is not None else None) for k, v in self._weight_operands(node).items()}
        self._ffn(self.operand(node.inputs[0]), node, w, out=node.outputs[0].name)

    def _lower_grouped_ffn(self, node: Node) -> None:
        em = self.em
        x, rows, sizes = (self.operand(v) for v in node.inputs[:3])
        weights = self._weight_operands(node)
        n_exp = int(weights["w_up"].type.shape[0])
        gathered = em.op("Gather", [x, rows], axis=0)                 # [A, H]
        if node.input("row_scale") is not None:  # Llama 4: the routing weight scales each row's input
            scale = self.cast_operand(node.input("row_scale"), node.inputs[0].type.dtype)
            gathered = em.op("Mul", [gathered, em.op("Unsqueeze", [scale, em.const([1])])])
        n_rows = em.rows_of(gathered)
        dropped = em.op("Sub", [n_rows, em.op("ReduceSum", [sizes, em.const([0])], keepdims=1)])
        identity = node.attrs["identity_experts"]
        if identity:  # LongCat-Flash: the identity experts' rows, after the FFN experts', pass through as one part
            passed = em.op("ReduceSum", [em.op("Slice", [sizes, em.const([n_exp]), em.const([n_exp + identity])]),
                                         em.const([0])], keepdims=1)
            sizes = em.op("Concat", [em.op("Slice", [sizes, em.const([0]), em.const([n_exp])]), passed], axis=0)
        split = em.op("Concat", [sizes, dropped], axis=0)              # E groups, then dropped rows
        parts = em.op("Split", [gathered, split], n_exp + 1 + (1 if identity else 0), axis=0)
        outs = []
        for e in range(n_exp):
            em.prefix = f"{node.name}/expert{e}"
            w = {}
            for key, value in weights.items():
                w[key] = None if value is None else self.expert_weight(value, e)
            outs.append(self._ffn(parts[e], node, w))
        em.prefix = node.name
        if identity:
            outs.append(parts[n_exp])
        # Dropped rows (past every group) are zeros, as in the reference.
        tail = em.op("Mul", [parts[-1], em.fconst(0.0, node.inputs[0].type.dtype)])
        em.op("Concat", outs + [tail], axis=0, out=node.outputs[0].name, name=node.name)

    def _lower_combine(self, node: Node) -> None:
        # Not ScatterND(reduction=add): ONNX Runtime's CPU kernel adds the update rows of duplicate indices
        # from several threads without synchronisation, so with intra-op threads a token summed from k rows
        # now and then loses one (measured on the DeepSeekMoE-16B layer at 1024 tokens: 1-2 tokens wrong by
        # ~1e-2 in most runs; onnxruntime issues 18048, 23396). The rows are regrouped by token instead and
        # summed with ordinary reductions, which is deterministic on every runtime.
        em = self.em
        _, rows, _, like = (self.operand(v) for v in node.inputs)
        dt = node.inputs[0].type.dtype
        # f16/bf16 rows are weighted and summed in float32, then rounded once to their type: the float32 sum
        # of a token's rows is the more accurate one.
        y = self.cast_operand(node.inputs[0], ElemType.FLOAT32)
        hidden = node.outputs[0].type.shape[1]
        if node.attrs["weighted"]:
            row_w = self.cast_operand(node.inputs[2], ElemType.FLOAT32)
            weighted = em.op("Mul", [y, em.op("Unsqueeze", [row_w, em.const([1])])])
        else:  # the weights scaled the expert inputs (grouped_ffn's row_scale)
            weighted = y
        n_assign = em.op("Shape", [rows])
        n_assign_s = em.scalar(n_assign)
        arange = em.op("Range", [em.const(0), n_assign_s, em.const(1)])
        # Stable order of the rows by token (unique keys token*A + position, as dispatch sorts).
        by_token = em.op("TopK", [em.op("Add", [em.op("Mul", [rows, n_assign_s]), arange]), n_assign], 2, axis=0,
                         largest=0, sorted=1)[1]
        grouped = em.op("Gather", [weighted, by_token])
        k = rows_per_token(node)
        low = dt != ElemType.FLOAT32
        result = {} if low else {"out": node.outputs[0].name, "name": node.name}
        if k is not None:
            # Token choice: every token owns exactly k rows (dropped ones included, with weight 0).
            summed = em.op("ReduceSum", [em.op("Reshape", [grouped, em.const([-1, k, hidden])]), em.const([1])],
                           keepdims=0, **result)
        else:
            # Expert choice: a token owns any number of rows. Its sum is the difference of a running sum at
            # the ends of its segment, in float64 so that the subtraction loses nothing a float32 sum keeps.
            counts = em.op("ScatterElements", [em.zeros(em.rows_of(like), TensorProto.INT64), rows,
                                               em.zeros(n_assign, TensorProto.INT64, 1)], axis=0, reduction="add")
            ends = em.op("CumSum", [counts, em.const(0)])
            running = em.op("CumSum", [em.op("Cast", [grouped], to=TensorProto.DOUBLE), em.const(0)])
            running = em.op("Concat", [em.zeros(em.const([1, hidden]), TensorProto.DOUBLE), running], axis=0)
            total = em.op("Sub", [em.op("Gather", [running, ends]),
                                  em.op("Gather", [running, em.op("Sub", [ends, counts])])])
            summed = em.op("Cast", [total], to=TensorProto.FLOAT, **result)
        if low:
            em.op("Cast", [summed], out=node.outputs[0].name, name=node.name, to=ONNX_DTYPE[dt])

    def _lower_sigmoid_gate(self, node: Node) -> None:
        em = self.em
        y, x, w = node.inputs
        dt = x.type.dtype
        gate = em.op("Sigmoid", [em.op("Gemm", [self.operand(x), self.cast_operand(w, dt)], transB=1)])
        em.op("Mul", [self.operand(y), em.cast(gate, dt, y.type.dtype)], out=node.outputs[0].name, name=node.name)

    def _lower_add(self, node: Node) -> None:
        a, b = node.inputs
        self.em.op("Add", [self.operand(a), self.cast_operand(b, a.type.dtype)], out=node.outputs[0].name,
                   name=node.name)

    def _lower_concat(self, node: Node) -> None:
        self.em.op("Concat", [self.operand(v) for v in node.inputs], out=node.outputs[0].name, name=node.name,
                   axis=node.attrs["axis"])
