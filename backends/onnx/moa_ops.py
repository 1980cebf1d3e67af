"""Lowering of mixture of attention heads (JetMoE's MoA: model_ops.moa_attention, cached_moa_attention) and of the
MoE block output bias (add_bias) to standard ONNX.

The router's record (expert_idx, weights [T, k]) is the graph's routing ops, lowered as every MoE layer's are.
Every expert's query projection runs as one Gemm over the stacked w_q [E, kv*d, H] viewed as [E*kv*d, H]; the
k chosen experts' queries are picked with GatherElements. After attention (the decoder's shared RoPE tables, masks
and grouped-query `_attend`: query heads kv-head-major, h*k + j, so head i reads kv head i // k) each chosen
expert's output, times its routing weight, is scattered into its expert's slot of a zero [T, E, kv*d] tensor, and
one Gemm with w_o laid out [H, E*kv*d] (a Transpose + Reshape of the initializer, constant for the runtime) applies
every output projection and sums them, b_o as its bias. The projections cost E/k times those of the chosen experts
alone; no shape depends on the routing. Decode: the shared K/V are cached as cached_attention's are.
"""
from __future__ import annotations

from typing import Callable

from moe_ir.ir import ElemType, Node
from moe_ir.ir.model_ops import attention_scale, rope_dims
from .decoder_ops import DecoderOps
from .emit import ONNX_DTYPE


class MoaOps(DecoderOps):
    """`_lower_<op>` for moa_attention, cached_moa_attention and add_bias."""

    def _lower_add_bias(self, node: Node) -> None:
        y, bias = node.inputs
        self.em.op("Add", [self.operand(y), self.cast_operand(bias, y.type.dtype)], out=node.outputs[0].name,
                   name=node.name)

    def _moa_heads(self, node: Node, tables: Callable[[str, int], tuple[str, str]]):
        """x's chosen-expert queries q [B, kv*k, S, d] and shared k, v [B, kv, S, d], q and k rotated (`tables` as in
        _mha_heads). Returns (x, [B, S], tokens [T, H], the gather indices [T, k, kv*d], q, k, v)."""
        em, a = self.em, node.attrs
        x, w_q = node.inputs[0], node.input("w_q")
        dt = x.type.dtype
        kv, d = a["kv_heads"], a["head_dim"]
        experts, width, hidden = w_q.type.shape
        k = node.input("expert_idx").type.shape[1]
        xs = self.operand(x)
        tokens = em.op("Reshape", [xs, em.const([-1, hidden])])
        batch_seq = em.op("Shape", [xs], start=0, end=2)
        stacked = em.op("Reshape", [self.cast_operand(w_q, dt), em.const([experts * width, hidden])])
        every = em.op("Reshape", [em.op("Gemm", [tokens, stacked], transB=1), em.const([-1, experts, width])])
        idx = em.op("Unsqueeze", [self.operand(node.input("expert_idx")), em.const([2])])
        picks = em.op("Expand", [idx, em.op("Concat", [em.op("Shape", [idx], start=0, end=2), em.const([width])],
                                            axis=0)])
        q = em.op("GatherElements", [every, picks], axis=1)                                 # [T, k, kv*d]
        q = em.op("Reshape", [q, em.op("Concat", [batch_seq, em.const([k, kv, d])], axis=0)], allowzero=1)
        q = em.op("Transpose", [q], perm=[0, 3, 2, 1, 4])                                   # [B, kv, k, S, d]
        heads_shape = em.op("Concat", [em.op("Shape", [xs], start=0, end=1), em.const([kv * k]),
                                       em.op("Shape", [xs], start=1, end=2), em.const([d])], axis=0)
        q = em.op("Reshape", [q, heads_shape], allowzero=1)
        keys = self._split_heads(self._project(tokens, node.input("w_k"), None, dt), batch_seq, kv, d)
        values = self._split_heads(self._project(tokens, node.input("w_v"), None, dt), batch_seq, kv, d)
        rotated = rope_dims(a, d)
        if rotated:
            cos_sin = tables(xs, rotated)
            q, keys = (self._rope(t, d, cos_sin, a["rope_layout"], rotated) for t in (q, keys))
        return xs, batch_seq, tokens, picks, q, keys, values

    def _moa_output(self, node: Node, o: str, batch_seq: str, picks: str) -> None:
        """o [T, kv*k*d] (heads h*k + j) -> each chosen expert's output projection, weighted and summed, + b_o:
        the node's output [B, S, H]."""
        em, a = self.em, node.attrs
        x, w_o = node.inputs[0], node.input("w_o")
        dt = x.type.dtype
        kv, d = a["kv_heads"], a["head_dim"]
        experts, hidden, width = w_o.type.shape
        k = node.input("expert_idx").type.shape[1]
        chosen = em.op("Transpose", [em.op("Reshape", [o, em.const([-1, kv, k, d])])], perm=[0, 2, 1, 3])
        chosen = em.op("Reshape", [chosen, em.const([-1, k, width])])                        # [T, k, kv*d]
        gates = em.op("Unsqueeze", [self.cast_operand(node.input("weights"), dt), em.const([2])])
        chosen = em.op("Mul", [chosen, gates])
        slots_shape = em.op("Concat", [em.rows_of(chosen), em.const([experts, width])], axis=0)
        slots = em.op("ScatterElements", [em.zeros(slots_shape, ONNX_DTYPE[dt]), picks, chosen], axis=1)
        slots = em.op("Reshape", [slots, em.const([-1, experts * width])])
        outputs = em.op("Reshape", [em.op("Transpose", [self.cast_operand(w_o, dt)], perm=[1, 0, 2]),
                                    em.const([hidden, experts * width])])
        ins = [slots, outputs] + ([self.cast_operand(node.input("b_o"), dt)] if node.input("b_o") is not None else [])
        y = em.op("Gemm", ins, transB=1)
        shape = em.op("Concat", [batch_seq, em.const([hidden])], axis=0)
        em.op("Reshape", [y, shape], allowzero=1, out=node.outputs[0].name, name=node.name)

    def _lower_moa_attention(self, node: Node) -> None:
        a, dt = node.attrs, node.inputs[0].type.dtype
        kv, d = a["kv_heads"], a["head_dim"]
        heads = kv * node.input("expert_idx").type.shape[1]
        xs, batch_seq, _, picks, q, k, v = self._moa_heads(node, lambda xs, r: self._rope_tables(xs, r, a, dt))
        o = self._causal_attention(xs, q, k, v, heads, kv, d, attention_scale(a, d), dt)
        self._moa_output(node, o, batch_seq, picks)

    def _lower_cached_moa_attention(self, node: Node) -> None:
        a, dt = node.attrs, node.inputs[0].type.dtype
        kv, d = a["kv_heads"], a["head_dim"]
        heads = kv * node.input("expert_idx").type.shape[1]
        positions = self.operand(node.input("position_ids"))
        xs, batch_seq, _, picks, q, k, v = self._moa_heads(
            node, lambda xs, r: self._rope_tables_at(positions, r, a, dt))
        k = self._append_cache(node, "past_key", k)
        v = self._append_cache(node, "past_value", v)
        mask = self.operand(node.input("attention_mask"))
        o = self._attend(q, k, v, heads, kv, d, attention_scale(a, d), dt, lambda: self._hidden_keys(xs, mask))
        self._moa_output(node, o, batch_seq, picks)
