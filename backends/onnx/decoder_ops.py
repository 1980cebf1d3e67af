"""Lowering of the whole-model (decoder) ops to standard ONNX: embedding, RMSNorm, attention and MLA.

Whole models (model_builder.build_model_graph: input_ids i64[B,S] -> logits [B,S,V] and the routing record
of every MoE layer, `layers.{i}.expert_idx` / `layers.{i}.weights`) lower in the portable and ort flavours;
the MoE layers inside lower as in moe_ops.py, one per `layers.{i}.moe.` prefix. The plugin flavour exports
layers only: its contract is one fused node per file.

Embedding is Gather; rms_norm takes its statistics in float32 as the reference; attention and mla_attention
project with Gemm(transB=1) on the flattened tokens [B*S, H], so weights stay in their stored [out, in]
layout (a MatMul would need a transposed copy of each), split heads with Reshape/Transpose, and build the
causal mask (Greater of two Ranges) and the RoPE cos/sin tables (Range(0, S) x inverse frequencies fixed at
export) from the run's S, so one file takes any B and S and has no maximum length. Mask and tables are
emitted once and shared by every layer. GQA broadcasts each kv head over its query heads in MatMul, copying
nothing. Shapes built at run time from Shape() use Reshape(allowzero=1), so an empty batch is not misread as
"copy this dim".

Decode form (cached_attention, cached_mla_attention; model_builder's decode graph): one file serves prefill
(an empty past, P = 0) and decode. The RoPE tables come from position_ids [B, S] instead of 0..S-1, the
present cache is Concat(past, new) along dim 2 under GenAI's names (present.{i}.key/value), and the mask of
hidden keys [B, 1, S, P+S] is built once from attention_mask and the run's S as model_ops.visible_keys states
it (left padding masked, a token always sees itself). The MLA latent cache is expanded to per-head K/V from
the whole cache at each call, as the reference does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from onnx import TensorProto

from moe_ir.ir import ElemType, Node, Value
from moe_ir.model_builder import MLACacheLayout
from moe_ir.ir.model_ops import (attention_scale, is_longrope, rope_cos_sin_factor, rope_dims,
                                 rope_inverse_frequencies)
from moe_ir.model_spec import QKNorm, RopeLayout
from .emit import ONNX_DTYPE
from .lowering import Lowering


class DecoderOps(Lowering):
    """`_lower_<op>` for the whole-model ops; attention layers share their mask and RoPE tables."""

    def _lower_embedding(self, node: Node) -> None:
        ids, weight = node.inputs
        self.em.op("Gather", [self.operand(weight), self.operand(ids)], axis=0, out=node.outputs[0].name,
                   name=node.name)

    def _lower_scale(self, node: Node) -> None:
        x = node.inputs[0]
        self.em.op("Mul", [self.operand(x), self.em.fconst(node.attrs["factor"], x.type.dtype, "factor")],
                   out=node.outputs[0].name, name=node.name)

    def _lower_rms_norm(self, node: Node) -> None:
        x, weight = node.inputs
        self._rms_norm(self.operand(x), weight, node.attrs["eps"], x.type.dtype, out=node.outputs[0].name,
                       name=node.name)

    def _lower_layer_norm(self, node: Node) -> None:
        # LayerNormalization in float32 (the reference's statistics and affine), rounded back to x's type.
        em = self.em
        x, weight, bias = node.inputs
        dt = x.type.dtype
        ins = [self.cast_operand(x, ElemType.FLOAT32), self.cast_operand(weight, ElemType.FLOAT32)]
        if bias is not None:
            ins.append(self.cast_operand(bias, ElemType.FLOAT32))
        if dt == ElemType.FLOAT32:
            em.op("LayerNormalization", ins, out=node.outputs[0].name, name=node.name, axis=-1,
                  epsilon=node.attrs["eps"])
        else:
            y = em.op("LayerNormalization", ins, name=node.name, axis=-1, epsilon=node.attrs["eps"])
            em.op("Cast", [y], out=node.outputs[0].name, to=ONNX_DTYPE[dt])

    def _rms_norm(self, x: str, weight: Value, eps: float, dt: ElemType, **out) -> str:
        """rms_norm_math: statistics in float32 (the reference's), the result rounded to dt, then * weight."""
        em = self.em
        xf = em.cast(x, dt, ElemType.FLOAT32)
        mean_sq = em.op("ReduceMean", [em.op("Mul", [xf, xf]), em.const([-1])], keepdims=1)
        inv = em.op("Reciprocal", [em.op("Sqrt", [em.op("Add", [mean_sq, em.const(eps, np.float32, "eps")])])])
        normed = em.cast(em.op("Mul", [xf, inv]), ElemType.FLOAT32, dt)
        return em.op("Mul", [self.cast_operand(weight, dt), normed], **out)

    def _project(self, tokens: str, w: Value, b: Value | None, dt: ElemType) -> str:
        """tokens [T, in] @ w[out, in]^T (+ b): [T, out]."""
        ins = [tokens, self.cast_operand(w, dt)] + ([self.cast_operand(b, dt)] if b is not None else [])
        return self.em.op("Gemm", ins, transB=1)

    def _split_heads(self, t: str, batch_seq: str, heads: int, dim: int) -> str:
        """[T, heads*dim] -> [B, heads, S, dim]."""
        em = self.em
        shape = em.op("Concat", [batch_seq, em.const([heads, dim])], axis=0)
        return em.op("Transpose", [em.op("Reshape", [t, shape], allowzero=1)], perm=[0, 2, 1, 3])

    # The attributes RoPE's tables depend on (layers with equal values share one table).
    ROPE_KEYS = ("rope_theta", "yarn_factor", "yarn_original_max_positions", "yarn_beta_fast", "yarn_beta_slow",
                 "yarn_truncate", "rope_attention_factor", "llama3_factor", "llama3_original_max_positions",
                 "llama3_low_freq_factor", "llama3_high_freq_factor", "longrope_short_factors",
                 "longrope_long_factors", "longrope_original_max_positions", "longrope_short_mscale",
                 "longrope_long_mscale")

    def _cos_sin(self, positions: str, dim: int, attrs, dt: ElemType, long: bool = False) -> tuple[str, str]:
        """cos, sin of positions (float32, any shape ending in 1) times the inverse frequencies (the reference's,
        computed at export; LongRoPE's long ones when `long`), times the cos/sin factor, in dt."""
        em = self.em
        inv_freq = rope_inverse_frequencies(attrs, dim, torch.float32, long=long).numpy()
        angles = em.op("Mul", [positions, em.const(inv_freq, np.float32, "inv_freq")])
        cos, sin = em.op("Cos", [angles]), em.op("Sin", [angles])
        factor = rope_cos_sin_factor(attrs, long)
        if factor != 1.0:
            scale = em.const(np.float32(factor), np.float32, "rope_attention_factor")
            cos, sin = em.op("Mul", [cos, scale]), em.op("Mul", [sin, scale])
        return em.cast(cos, ElemType.FLOAT32, dt), em.cast(sin, ElemType.FLOAT32, dt)

    def _long_or_short(self, last: str, positions: str, dim: int, attrs, dt: ElemType) -> tuple[str, str]:
        """LongRoPE's tables: the long ones where the call's sequence (`last`, i64 [1]: its last position + 1)
        passes the original context, else the short ones (model_ops.rope_cos_sin / rope_cos_sin_at)."""
        em = self.em
        short, long = self._cos_sin(positions, dim, attrs, dt), self._cos_sin(positions, dim, attrs, dt, True)
        is_long = em.op("Greater", [last, em.const([attrs["longrope_original_max_positions"]])])
        return tuple(em.op("Where", [is_long, b, a]) for a, b in zip(short, long))

    def _rope_tables(self, x: str, dim: int, attrs, dt: ElemType) -> tuple[str, str]:
        """cos, sin [S, dim/2] for positions 0..S-1 of x [B, S, .], as model_ops.rope_cos_sin computes them:
        the inverse frequencies (YaRN's too) in float32 at export by the reference's own function, positions from
        the run's S, times the attention factor."""
        key = ("rope", dim, dt) + tuple(attrs[k] for k in self.ROPE_KEYS)
        if key not in self.shared:
            em = self.em
            length = self._seq_len(x)
            positions = em.op("Cast", [em.op("Range", [em.const(0), length, em.const(1)])], to=TensorProto.FLOAT)
            positions = em.op("Unsqueeze", [positions, em.const([1])])
            if is_longrope(attrs):
                last = em.op("Unsqueeze", [length, em.const([0])])
                self.shared[key] = self._long_or_short(last, positions, dim, attrs, dt)
            else:
                self.shared[key] = self._cos_sin(positions, dim, attrs, dt)
        return self.shared[key]

    def _seq_len(self, x: str) -> str:
        """[] int64: S of x [B, S, .]."""
        return self.em.scalar(self.em.op("Shape", [x], start=1, end=2))

    def _rope(self, t: str, dim: int, tables: tuple[str, str], layout: RopeLayout, rotated: int | None = None) -> str:
        """apply_rope on the last axis (of size dim) of t [..., S, dim]: its first `rotated` dims (default all)
        rotate, the others pass through."""
        em = self.em
        cos, sin = tables
        axis = em.const([-1])
        r = dim if rotated is None else rotated
        rest = em.op("Slice", [t, em.const([r]), em.const([dim]), axis]) if r < dim else None
        if r < dim:
            t = em.op("Slice", [t, em.const([0]), em.const([r]), axis])
        if layout == RopeLayout.HALF:
            half = r // 2
            x1 = em.op("Slice", [t, em.const([0]), em.const([half]), axis])
            x2 = em.op("Slice", [t, em.const([half]), em.const([r]), axis])
        else:  # even dims pair with the odd dim after them; written de-interleaved, as the reference
            x1 = em.op("Slice", [t, em.const([0]), em.const([r]), axis, em.const([2])])
            x2 = em.op("Slice", [t, em.const([1]), em.const([r]), axis, em.const([2])])
        first = em.op("Sub", [em.op("Mul", [x1, cos]), em.op("Mul", [x2, sin])])
        second = em.op("Add", [em.op("Mul", [x2, cos]), em.op("Mul", [x1, sin])])
        return em.op("Concat", [first, second] + ([rest] if rest is not None else []), axis=-1)

    def _future_mask(self, x: str, window: int | None = None, chunk: int | None = None) -> str:
        """[S, S] bool, true where key position j > query position i (what causal attention hides), and with a
        sliding window W also where i - j >= W, with chunks of C also where j // C != i // C."""
        key = ("future", window, chunk)
        if key not in self.shared:
            em = self.em
            pos = em.op("Range", [em.const(0), self._seq_len(x), em.const(1)])
            keys, queries = em.op("Unsqueeze", [pos, em.const([0])]), em.op("Unsqueeze", [pos, em.const([1])])
            hidden = em.op("Greater", [keys, queries])
            if window is not None:
                too_old = em.op("Not", [em.op("Less", [em.op("Sub", [queries, keys]), em.const(window)])])
                hidden = em.op("Or", [hidden, too_old])
            if chunk is not None:  # positions are >= 0, so integer Div (truncating) is the floor
                size = em.const(chunk)
                same_chunk = em.op("Equal", [em.op("Div", [keys, size]), em.op("Div", [queries, size])])
                other_chunk = em.op("Not", [same_chunk])
                hidden = em.op("Or", [hidden, other_chunk])
            self.shared[key] = hidden
        return self.shared[key]

    def _causal_attention(self, x: str, q: str, k: str, v: str, heads: int, kv_heads: int, dv: int,
                          scale: float, dt: ElemType, sinks: Value | None = None, window: int | None = None,
                          chunk: int | None = None) -> str:
        """model_ops.causal_attention: q [B,h,S,d], k [B,hk,S,d], v [B,hk,S,dv] -> [B*S, h*dv]."""
        return self._attend(q, k, v, heads, kv_heads, dv, scale, dt,
                            lambda: (self._future_mask(x, window, chunk),) * 2, sinks)

    def _tuned_queries(self, q: str, positions: str, attrs, dt: ElemType) -> str:
        """model_ops.tuned_queries: q [B, h, S, d] times 1 + scale * ln(1 + floor((p + 1) / floor_scale)) of each
        token's position (positions i64, [1, 1, S, 1] or [B, 1, S, 1]), in float32, rounded back to dt."""
        if attrs["temperature_floor_scale"] is None:
            return q
        em = self.em
        p = em.op("Cast", [positions], to=TensorProto.FLOAT)
        steps = em.op("Floor", [em.op("Div", [em.op("Add", [p, em.const(np.float32(1.0), np.float32, "one")]),
                                               em.const(np.float32(attrs["temperature_floor_scale"]), np.float32,
                                                        "floor_scale")])])
        log1p = em.op("Log", [em.op("Add", [steps, em.const(np.float32(1.0), np.float32, "one")])])
        scales = em.op("Add", [em.op("Mul", [log1p, em.const(np.float32(attrs["temperature_scale"]), np.float32,
                                                             "temperature_scale")]),
                               em.const(np.float32(1.0), np.float32, "one")])
        return em.cast(em.op("Mul", [em.cast(q, dt, ElemType.FLOAT32), scales]), ElemType.FLOAT32, dt)

    def _unit_rms(self, x: str, eps: float, dt: ElemType) -> str:
        """model_ops.unit_rms: x * rsqrt(mean(x^2) + eps) over the last axis, no weight, in float32."""
        em = self.em
        xf = em.cast(x, dt, ElemType.FLOAT32)
        mean_sq = em.op("ReduceMean", [em.op("Mul", [xf, xf]), em.const([-1])], keepdims=1)
        inv = em.op("Reciprocal", [em.op("Sqrt", [em.op("Add", [mean_sq, em.const(eps, np.float32, "eps")])])])
        return em.cast(em.op("Mul", [xf, inv]), ElemType.FLOAT32, dt)

    def _attend(self, q: str, k: str, v: str, heads: int, kv_heads: int, dv: int, scale: float, dt: ElemType,
                masks: Callable[[], tuple[str, str]], sinks: Value | None = None) -> str:
        """model_ops.attend: q [B,h,S,d], k [B,hk,L,d], v [B,hk,L,dv] -> [B*S, h*dv]. `masks()` gives the bool
        tensor true where a key is hidden, broadcastable to the scores [B,h,S,L], and the same for the grouped
        scores [B,hk,rep,S,L] of GQA (called where the mask is used, so shared masks are emitted there);
        `sinks` [h]: one more logit per head (gpt-oss)."""
        em = self.em
        rep = heads // kv_heads
        if rep > 1:
            # Query head i reads kv head i // rep: view the query heads as [B, hk, rep, S, d] and let MatMul
            # broadcast k/v [B, hk, 1, L, .] over rep, instead of materialising repeated k/v heads.
            shape = em.op("Concat", [em.op("Shape", [q], start=0, end=1), em.const([kv_heads, rep]),
                                     em.op("Shape", [q], start=2)], axis=0)
            q = em.op("Reshape", [q, shape], allowzero=1)
            k = em.op("Unsqueeze", [k, em.const([2])])
            v = em.op("Unsqueeze", [v, em.const([2])])
        perm = [0, 1, 2, 4, 3] if rep > 1 else [0, 1, 3, 2]
        scores = em.op("Mul", [em.op("MatMul", [q, em.op("Transpose", [k], perm=perm)]),
                               em.fconst(scale, dt, "scale")])
        hidden = masks()[1 if rep > 1 else 0]
        scores = em.op("Where", [hidden, em.fconst(-np.inf, dt, "neg_inf"), scores])
        # Softmax in float32 (the reference's compute type for f16/bf16 graphs), probabilities back in dt.
        scores = em.cast(scores, dt, ElemType.FLOAT32)
        if sinks is not None:
            # One more logit per head (gpt-oss's sinks), a column of its own that the softmax normalises with
            # and that is then dropped: the real keys' weights sum to less than 1.
            grouping = [kv_heads, rep] if rep > 1 else [heads]
            sink = em.op("Reshape", [self.cast_operand(sinks, ElemType.FLOAT32),
                                     em.const([1] + grouping + [1, 1])])
            column = em.op("Concat", [em.op("Shape", [scores], start=0, end=-1), em.const([1])], axis=0)
            scores = em.op("Concat", [scores, em.op("Expand", [sink, column])], axis=-1)
            probs = em.op("Softmax", [scores], axis=-1)
            probs = em.op("Slice", [probs, em.const([0]), em.const([-1]), em.const([-1])])
        else:
            probs = em.op("Softmax", [scores], axis=-1)
        out = em.op("MatMul", [em.cast(probs, ElemType.FLOAT32, dt), v])   # [B, hk, (rep,) S, dv]
        if rep > 1:
            shape = em.op("Concat", [em.op("Shape", [out], start=0, end=1), em.const([heads]),
                                     em.op("Shape", [out], start=3)], axis=0)
            out = em.op("Reshape", [out, shape], allowzero=1)
        return em.op("Reshape", [em.op("Transpose", [out], perm=[0, 2, 1, 3]), em.const([-1, heads * dv])])

    def _output_projection(self, node: Node, o: str, batch_seq: str) -> None:
        """o [B*S, h*dv] @ w_o^T (+ b_o) -> the node's output [B, S, H]."""
        em = self.em
        dt = node.inputs[0].type.dtype
        y = self._project(o, node.input("w_o"), node.input("b_o"), dt)
        hidden = node.outputs[0].type.shape[2]
        shape = em.op("Concat", [batch_seq, em.const([hidden])], axis=0)
        em.op("Reshape", [y, shape], allowzero=1, out=node.outputs[0].name, name=node.name)

    def _mha_heads(self, node: Node, tables: Callable[[str, int], tuple[str, str]]):
        """The shared front of (cached) MHA/GQA: x's projections, the q/k norms, the split into heads and RoPE
        (`tables(x, rotated dims)` gives cos/sin: at positions 0..S-1, or at position_ids). Returns (x, [B, S],
        q [B,h,S,d], k [B,hk,S,d], v [B,hk,S,d])."""
        em, a = self.em, node.attrs
        x = node.inputs[0]
        dt = x.type.dtype
        heads, kv_heads, d = a["heads"], a["kv_heads"], a["head_dim"]
        norm, eps = a["qk_norm"], a["norm_eps"]
        xs = self.operand(x)
        tokens = em.op("Reshape", [xs, em.const([-1, x.type.shape[2]])])
        batch_seq = em.op("Shape", [xs], start=0, end=2)
        q, k, v = (self._project(tokens, node.input(f"w_{p}"), node.input(f"b_{p}"), dt) for p in "qkv")
        if norm == QKNorm.FULL:  # over the whole projection, before the split into heads (OLMoE)
            q = self._rms_norm(q, node.input("q_norm"), eps, dt)
            k = self._rms_norm(k, node.input("k_norm"), eps, dt)
        if a["clip_qkv"] is not None:  # OLMoE, DBRX: each projection clamped to [-c, c], in float32 as the reference's bound
            c = a["clip_qkv"]
            bounds = [em.const(-c, np.float32, "clip_min"), em.const(c, np.float32, "clip_max")]
            q, k, v = (em.cast(em.op("Clip", [em.cast(t, dt, ElemType.FLOAT32), *bounds]), ElemType.FLOAT32, dt)
                       for t in (q, k, v))
        q = self._split_heads(q, batch_seq, heads, d)
        k = self._split_heads(k, batch_seq, kv_heads, d)
        v = self._split_heads(v, batch_seq, kv_heads, d)
        if norm == QKNorm.HEAD:  # over each head's head_dim (the last axis)
            q = self._rms_norm(q, node.input("q_norm"), eps, dt)
            k = self._rms_norm(k, node.input("k_norm"), eps, dt)
        rotated = rope_dims(a, d)
        if rotated:  # 0: a layer without positional encoding
            cos_sin = tables(xs, rotated)
            q, k = (self._rope(t, d, cos_sin, a["rope_layout"], rotated) for t in (q, k))
        if norm == QKNorm.HEAD_AFTER_ROPE:  # over each head, after RoPE (Hunyuan)
            q = self._rms_norm(q, node.input("q_norm"), eps, dt)
            k = self._rms_norm(k, node.input("k_norm"), eps, dt)
        elif norm == QKNorm.WEIGHTLESS_AFTER_ROPE:  # over each head, after RoPE, no weight (Llama 4)
            q, k = self._unit_rms(q, eps, dt), self._unit_rms(k, eps, dt)
        return xs, batch_seq, q, k, v

    def _lower_attention(self, node: Node) -> None:
        a, dt = node.attrs, node.inputs[0].type.dtype
        xs, batch_seq, q, k, v = self._mha_heads(node, lambda xs, r: self._rope_tables(xs, r, a, dt))
        if a["temperature_floor_scale"] is not None:
            em = self.em
            positions = em.op("Range", [em.const(0), self._seq_len(xs), em.const(1)])
            q = self._tuned_queries(q, em.op("Unsqueeze", [positions, em.const([0, 1, 3])]), a, dt)
        o = self._causal_attention(xs, q, k, v, a["heads"], a["kv_heads"], a["head_dim"],
                                   attention_scale(a, a["head_dim"]), dt, node.input("sinks"), a["sliding_window"],
                                   a["chunk_size"])
        self._output_projection(node, o, batch_seq)

    def _mla_latents(self, node: Node, tables: Callable[[str, int], tuple[str, str]]):
        """The shared front of (cached) MLA: the queries (full or low-rank), the normalised latent c_kv and the
        one rotary key every head shares, RoPE applied (`tables` as in _mha_heads). Returns (x, [B, S],
        q_nope [B,n,S,nope], q_rot [B,n,S,rope], c_kv [B*S, rank], k_rot [B,1,S,rope])."""
        em, a = self.em, node.attrs
        x = node.inputs[0]
        dt = x.type.dtype
        n, eps = a["heads"], a["norm_eps"]
        nope, rope, rank = a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["kv_lora_rank"]
        xs = self.operand(x)
        tokens = em.op("Reshape", [xs, em.const([-1, x.type.shape[2]])])
        batch_seq = em.op("Shape", [xs], start=0, end=2)
        if node.input("w_q") is not None:
            q = self._project(tokens, node.input("w_q"), None, dt)
        else:  # low-rank query: q_b(rms_norm(q_a(x)))
            q_a = self._project(tokens, node.input("w_q_a"), node.input("b_q_a"), dt)
            q = self._project(self._rms_norm(q_a, node.input("q_a_norm"), eps, dt), node.input("w_q_b"), None, dt)
        if a["q_latent_scale"] != 1.0:  # LongCat-Flash's LoRA scales
            q = em.op("Mul", [q, em.fconst(a["q_latent_scale"], dt, "q_latent_scale")])
        q_nope, q_rot = em.op("Split", [self._split_heads(q, batch_seq, n, nope + rope), em.const([nope, rope])], 2,
                              axis=-1)
        # The compressed latent c_kv and the one rotary key every head shares.
        c_kv, k_rot = em.op("Split", [self._project(tokens, node.input("w_kv_a"), node.input("b_kv_a"), dt),
                                      em.const([rank, rope])], 2, axis=-1)
        c_kv = self._rms_norm(c_kv, node.input("kv_a_norm"), eps, dt)
        if a["kv_latent_scale"] != 1.0:
            c_kv = em.op("Mul", [c_kv, em.fconst(a["kv_latent_scale"], dt, "kv_latent_scale")])
        cos_sin = tables(xs, rope)
        q_rot = self._rope(q_rot, rope, cos_sin, a["rope_layout"])
        k_rot = self._rope(self._split_heads(k_rot, batch_seq, 1, rope), rope, cos_sin, a["rope_layout"])
        return xs, batch_seq, q_nope, q_rot, c_kv, k_rot

    def _lower_mla_attention(self, node: Node) -> None:
        em, a, dt = self.em, node.attrs, node.inputs[0].type.dtype
        n, nope, rope, dv = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        xs, batch_seq, q_nope, q_rot, c_kv, k_rot = self._mla_latents(
            node, lambda xs, r: self._rope_tables(xs, r, a, dt))
        kv = self._project(c_kv, node.input("w_kv_b"), None, dt)
        k_nope, v = em.op("Split", [self._split_heads(kv, batch_seq, n, nope + dv), em.const([nope, dv])], 2, axis=-1)
        k_rot = em.op("Expand", [k_rot, em.op("Shape", [q_rot])])   # [B, 1, S, rope] -> [B, n, S, rope]
        q = em.op("Concat", [q_nope, q_rot], axis=-1)
        k = em.op("Concat", [k_nope, k_rot], axis=-1)
        o = self._causal_attention(xs, q, k, v, n, n, dv, attention_scale(a, nope + rope), dt)
        self._output_projection(node, o, batch_seq)

    # -- decode form (a KV cache in and out) ---------------------------------------------------------

    def _rope_tables_at(self, position_ids: str, dim: int, attrs, dt: ElemType) -> tuple[str, str]:
        """cos, sin [B, 1, S, dim/2] at the position_ids i64 [B, S] of each new token, as model_ops.rope_cos_sin_at
        computes them (the reference's inverse frequencies, YaRN's too, and its attention factor); shared by every
        layer, like the prefill tables."""
        key = ("rope_at", dim, dt) + tuple(attrs[k] for k in self.ROPE_KEYS)
        if key not in self.shared:
            em = self.em
            positions = em.op("Cast", [em.op("Unsqueeze", [position_ids, em.const([1, 3])])], to=TensorProto.FLOAT)
            if is_longrope(attrs):   # [B, 1, S, dim/2] tables
                last = em.op("Add", [em.op("ReduceMax", [position_ids], keepdims=0), em.const(1)])
                last = em.op("Unsqueeze", [last, em.const([0])])
                self.shared[key] = self._long_or_short(last, positions, dim, attrs, dt)
            else:
                self.shared[key] = self._cos_sin(positions, dim, attrs, dt)
        return self.shared[key]

    def _hidden_keys(self, x: str, attention_mask: str, window: int | None = None, chunk: int | None = None,
                     position_ids: str | None = None) -> tuple[str, str]:
        """model_ops.visible_keys, negated: bool [B, 1, S, L], true where new token i (cache slot L-S+i) must
        not see key slot j (j > L-S+i, or padding, or with a sliding window W slot - j >= W, or with chunks of C
        key position cumsum(mask)[j] - 1 in another chunk than position_ids[i], but never itself); and the same
        as [B, 1, 1, S, L] for the grouped scores of GQA. Built once per window and chunk from the run's mask
        and S, shared by every layer."""
        name = ("hidden", window, chunk)
        if name not in self.shared:
            em = self.em
            total = em.op("Shape", [attention_mask], start=1, end=2)
            new = em.op("Shape", [x], start=1, end=2)
            slot = em.op("Add", [em.op("Range", [em.const(0), em.scalar(new), em.const(1)]),
                                 em.scalar(em.op("Sub", [total, new]))])
            slot = em.op("Unsqueeze", [slot, em.const([1])])                                     # [S, 1]
            key = em.op("Unsqueeze", [em.op("Range", [em.const(0), em.scalar(total), em.const(1)]),
                                      em.const([0])])                                            # [1, L]
            kept = em.op("Cast", [em.op("Unsqueeze", [attention_mask, em.const([1, 2])])], to=TensorProto.BOOL)
            seen = em.op("LessOrEqual", [key, slot])
            if window is not None:
                seen = em.op("And", [seen, em.op("Less", [em.op("Sub", [slot, key]), em.const(window)])])
            seen = em.op("And", [kept, seen])
            if chunk is not None:
                # Padding keys (position -1, which Div truncates to chunk 0) are hidden by `kept` already.
                size = em.const(chunk)
                key_positions = em.op("Sub", [em.op("CumSum", [attention_mask, em.const(1)]), em.const(1)])
                key_chunk = em.op("Unsqueeze", [em.op("Div", [key_positions, size]), em.const([1, 2])])  # [B,1,1,L]
                query_chunk = em.op("Unsqueeze", [em.op("Div", [position_ids, size]), em.const([1, 3])])  # [B,1,S,1]
                seen = em.op("And", [seen, em.op("Equal", [key_chunk, query_chunk])])
            visible = em.op("Or", [seen, em.op("Equal", [key, slot])])   # [B, 1, S, L]
            hidden = em.op("Not", [visible])
            self.shared[name] = (hidden, em.op("Unsqueeze", [hidden, em.const([2])]))
        return self.shared[name]

    def _append_cache(self, node: Node, port: str, new: str) -> str:
        """The present cache of one slot: the past [B, heads, P, dim] and the new tokens [B, heads, S, dim]
        along dim 2, named as the IR's present value (a graph output)."""
        out = node.output(port.replace("past", "present"))
        return self.em.op("Concat", [self.operand(node.input(port)), new], axis=2, out=out.name)

    def _lower_cached_attention(self, node: Node) -> None:
        a, dt = node.attrs, node.inputs[0].type.dtype
        positions = self.operand(node.input("position_ids"))
        xs, batch_seq, q, k, v = self._mha_heads(node, lambda xs, r: self._rope_tables_at(positions, r, a, dt))
        q = self._tuned_queries(q, self.em.op("Unsqueeze", [positions, self.em.const([1, 3])]), a, dt)
        k = self._append_cache(node, "past_key", k)
        v = self._append_cache(node, "past_value", v)
        mask, window, chunk = self.operand(node.input("attention_mask")), a["sliding_window"], a["chunk_size"]
        o = self._attend(q, k, v, a["heads"], a["kv_heads"], a["head_dim"], attention_scale(a, a["head_dim"]), dt,
                         lambda: self._hidden_keys(xs, mask, window, chunk, positions), node.input("sinks"))
        self._output_projection(node, o, batch_seq)

    def _lower_cached_mla_attention(self, node: Node) -> None:
        em, a, dt = self.em, node.attrs, node.inputs[0].type.dtype
        n, nope, rope, dv, rank = (a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"],
                                   a["kv_lora_rank"])
        positions = self.operand(node.input("position_ids"))
        xs, batch_seq, q_nope, q_rot, c_kv, k_rot = self._mla_latents(
            node, lambda xs, r: self._rope_tables_at(positions, r, a, dt))
        if a["cache_layout"] == MLACacheLayout.LATENT:
            # The cache holds the latent and the shared rotary key; per-head K/V are expanded from the whole
            # cache at each call, as the reference does (an absorbed kernel would skip the expansion).
            c_all = self._append_cache(node, "past_key", self._split_heads(c_kv, batch_seq, 1, rank))
            k_rot = self._append_cache(node, "past_value", k_rot)                               # [B, 1, L, rope]
            batch_len = em.op("Concat", [em.op("Shape", [c_all], start=0, end=1),
                                         em.op("Shape", [c_all], start=2, end=3)], axis=0)
            latent_tokens = em.op("Reshape", [c_all, em.const([-1, rank])])
        else:
            batch_len, latent_tokens = batch_seq, c_kv
        kv = self._project(latent_tokens, node.input("w_kv_b"), None, dt)
        k_nope, v = em.op("Split", [self._split_heads(kv, batch_len, n, nope + dv), em.const([nope, dv])], 2,
                          axis=-1)
        shape = em.op("Concat", [em.op("Shape", [k_nope], start=0, end=3), em.const([rope])], axis=0)
        k = em.op("Concat", [k_nope, em.op("Expand", [k_rot, shape])], axis=-1)
        if a["cache_layout"] != MLACacheLayout.LATENT:
            k = self._append_cache(node, "past_key", k)
            v = self._append_cache(node, "past_value", v)
        q = em.op("Concat", [q_nope, q_rot], axis=-1)
        mask = self.operand(node.input("attention_mask"))
        o = self._attend(q, k, v, n, n, dv, attention_scale(a, nope + rope), dt,
                         lambda: self._hidden_keys(xs, mask))
        self._output_projection(node, o, batch_seq)
