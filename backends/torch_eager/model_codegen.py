"""Generate a standalone PyTorch source file for a whole model spec (`model.py` of a model bundle).

The file holds the generated MoE layer of `codegen.py` (its spec is the model's `moe:` section) and a
decoder around it: embedding, per layer pre-norm attention and a dense or MoE FFN with residuals, final
norm and LM head. Like the layer file it depends on torch alone, copies the kernels it calls verbatim
from `kernels.py`, and calls them in the order the eager `MoEModel` walks the model graph, so the two
agree bitwise. Its forward returns what `MoEModel` returns for the training graph
(`build_model_graph(spec, training=True)`): logits, the routing record and the losses keyed
`layers.{i}.<name>`.
"""
from __future__ import annotations

import yaml

from moe_ir.model_builder import MLA_LATENT_NORM_EPS, model_spec_hash
from moe_ir.model_spec import AttentionKind, ModelSpec, QKNorm, model_spec_to_dict
from .codegen import (PARAMS_CLASS_LINES, _docstring_text, _dtype, _needed_kernels, kernel_closure,
                      kernel_source_lines, moe_layer_class_lines)


def _needed_model_kernels(spec: ModelSpec) -> list[str]:
    m = spec.model
    need = set(_needed_kernels(spec.moe)) | {"embedding", "rms_norm", "router_logits"}
    need.add("mla_attention" if m.attention.kind == AttentionKind.MLA else "attention")
    if m.dense_layers:
        need.add("ffn")
    return kernel_closure(need)


def _param(lines: list[str], owner: str, name: str, shape: tuple[int, ...], dtype: str, fill: str = "empty") -> None:
    dims = ", ".join(str(d) for d in shape)
    lines.append(f"        {owner}.{name} = nn.Parameter(torch.{fill}({dims}, dtype={dtype}))")


def _norm_param(lines: list[str], name: str, size: int, dtype: str) -> None:
    """An RMSNorm scale `name.weight` under the current module (a _Params namespace, as in the graph's names)."""
    lines.append(f"        self.{name} = _Params()")
    _param(lines, f"self.{name}", "weight", (size,), dtype, "ones")


def _attention_class(spec: ModelSpec) -> list[str]:
    m = spec.model
    a, h, dt = m.attention, m.hidden, _dtype(m.dtype.value)
    rope = f"{a.rope_theta!r}, {a.layout.value!r}"
    out = ["", "", "class Attention(nn.Module):"]
    if a.kind == AttentionKind.MLA:
        n, dqk, r = a.heads, a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank
        out.append(f'    """Multi-head latent attention: {n} heads, kv latent rank {r}, RoPE dims {a.qk_rope_head_dim} '
                   f'({a.layout.value}), causal."""')
        out += ["", "    def __init__(self):", "        super().__init__()"]
        if a.q_lora_rank is None:
            _param(out, "self", "w_q", (n * dqk, h), dt)
        else:
            _param(out, "self", "w_q_a", (a.q_lora_rank, h), dt)
            _norm_param(out, "q_a_norm", a.q_lora_rank, dt)
            _param(out, "self", "w_q_b", (n * dqk, a.q_lora_rank), dt)
        _param(out, "self", "w_kv_a", (r + a.qk_rope_head_dim, h), dt)
        _norm_param(out, "kv_a_norm", r, dt)
        _param(out, "self", "w_kv_b", (n * (a.qk_nope_head_dim + a.v_head_dim), r), dt)
        _param(out, "self", "w_o", (h, n * a.v_head_dim), dt)
        biased = {"b_q_a": a.qkv_bias and a.q_lora_rank is not None, "b_kv_a": a.qkv_bias, "b_o": a.out_bias}
        sizes = {"b_q_a": a.q_lora_rank, "b_kv_a": r + a.qk_rope_head_dim, "b_o": h}
        for name, present in biased.items():
            if present:
                _param(out, "self", name, (sizes[name],), dt, "zeros")
        q = "self.w_q, None, None, None" if a.q_lora_rank is None else \
            "None, self.w_q_a, self.q_a_norm.weight, self.w_q_b"
        biases = ", ".join(f"self.{name}" if present else "None" for name, present in biased.items())
        # The latent norms' eps is the model builder's constant, not rms_norm_eps (see model_builder.py).
        out += ["", "    def forward(self, x):",
                f"        return mla_attention(x, {q},",
                f"                             self.w_kv_a, self.kv_a_norm.weight, self.w_kv_b, self.w_o, {biases},",
                f"                             {n}, {r}, {a.qk_nope_head_dim}, {a.qk_rope_head_dim}, {a.v_head_dim}, "
                f"{rope}, {MLA_LATENT_NORM_EPS!r})"]
        return out
    d, nq, nkv = a.dim(h), a.heads, a.num_kv_heads
    out.append(f'    """{a.kind.value.upper()} self-attention: {nq} query heads, {nkv} key/value heads of dim {d}, '
               f'RoPE ({a.layout.value}), causal."""')
    out += ["", "    def __init__(self):", "        super().__init__()"]
    for name, rows, cols in (("w_q", nq * d, h), ("w_k", nkv * d, h), ("w_v", nkv * d, h), ("w_o", h, nq * d)):
        _param(out, "self", name, (rows, cols), dt)
    if a.qkv_bias:
        for name, size in (("b_q", nq * d), ("b_k", nkv * d), ("b_v", nkv * d)):
            _param(out, "self", name, (size,), dt, "zeros")
    if a.out_bias:
        _param(out, "self", "b_o", (h,), dt, "zeros")
    if a.qk_norm != QKNorm.NONE:
        q_size, k_size = (d, d) if a.qk_norm == QKNorm.HEAD else (nq * d, nkv * d)
        _norm_param(out, "q_norm", q_size, dt)
        _norm_param(out, "k_norm", k_size, dt)
    biases = ", ".join(f"self.b_{k}" if a.qkv_bias else "None" for k in "qkv")
    biases += ", self.b_o" if a.out_bias else ", None"
    norms = "self.q_norm.weight, self.k_norm.weight" if a.qk_norm != QKNorm.NONE else "None, None"
    out += ["", "    def forward(self, x):",
            f"        return attention(x, self.w_q, self.w_k, self.w_v, self.w_o, {biases}, {norms},",
            f"                         {nq}, {nkv}, {d}, {a.qk_norm.value!r}, {rope}, {m.rms_norm_eps!r})"]
    return out


def _dense_ffn_class(spec: ModelSpec) -> list[str]:
    m = spec.model
    h, f, dt, act = m.hidden, m.dense_width, _dtype(m.dtype.value), m.dense_activation
    out = ["", "", "class DenseFFN(nn.Module):",
           f'    """The FFN of the dense layers: width {f}, {act.value}."""',
           "", "    def __init__(self):", "        super().__init__()"]
    _param(out, "self", "w_up", (f, h), dt)
    _param(out, "self", "w_down", (h, f), dt)
    if act.gated:
        _param(out, "self", "w_gate", (f, h), dt)
    gate = "self.w_gate" if act.gated else "None"
    out += ["", "    def forward(self, x):",
            "        batch, seq, hidden = x.shape",
            f"        y = ffn(x.reshape(-1, hidden), self.w_up, self.w_down, {gate}, None, None, None, {act.value!r})",
            "        return y.view(batch, seq, y.shape[-1])"]
    return out


def _decoder_classes(spec: ModelSpec) -> list[str]:
    m = spec.model
    h, v, dt, eps = m.hidden, m.vocab_size, _dtype(m.dtype.value), m.rms_norm_eps
    aux_free = spec.moe.balance.aux_free is not None and spec.moe.router.choice.value == "token"
    out = ["", "", "class RMSNorm(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    _param(out, "self", "weight", (h,), dt, "ones")
    out += ["", "    def forward(self, x):", f"        return rms_norm(x, self.weight, {eps!r})"]

    out += ["", "", "class DecoderLayer(nn.Module):",
            '    """Pre-norm: x + attn(attn_norm(x)), then + ffn(ffn_norm(.)); the FFN is `moe` or dense `ffn`."""',
            "", "    def __init__(self, is_moe):", "        super().__init__()",
            "        self.attn_norm = RMSNorm()", "        self.attn = Attention()",
            "        self.ffn_norm = RMSNorm()"]
    if m.dense_layers:
        out += ["        if is_moe:", "            self.moe = MoELayer()",
                "        else:", "            self.ffn = DenseFFN()"]
    else:
        out += ["        self.moe = MoELayer()  # every layer is MoE"]

    out += ["", "", "class DecoderModel(nn.Module):",
            f"    vocab_size = {v}", f"    hidden = {h}", f"    moe_layers = {tuple(m.moe_layers)!r}",
            "", "    def __init__(self):", "        super().__init__()",
            "        self.embed = _Params()"]
    _param(out, "self.embed", "weight", (v, h), dt)
    out.append(f"        self.layers = nn.ModuleList([DecoderLayer(i in self.moe_layers) for i in range({m.layers})])")
    out.append("        self.norm = RMSNorm()")
    if not m.tied_embeddings:
        out.append("        self.lm_head = _Params()")
        _param(out, "self.lm_head", "weight", (v, h), dt)
    head = "self.embed.weight" if m.tied_embeddings else "self.lm_head.weight"
    out += ["", "    def forward(self, input_ids, generator=None):",
            '        """input_ids int64 [B, S] -> (logits [B, S, V], routing record, balance losses), keyed',
            "        layers.{i}.<name> for MoE layer i.\"\"\"",
            "        batch, seq = input_ids.shape",
            "        x = embedding(input_ids, self.embed.weight)",
            "        routing, losses = {}, {}",
            "        for i, layer in enumerate(self.layers):",
            "            x = x + layer.attn(layer.attn_norm(x))",
            "            h = layer.ffn_norm(x)",
            "            if i in self.moe_layers:",
            "                y, layer_routing, layer_losses = layer.moe(h, generator)",
            "                routing.update({f'layers.{i}.{key}': value for key, value in layer_routing.items()})",
            "                losses.update({f'layers.{i}.loss.{key}': value for key, value in layer_losses.items()})",
            "            else:",
            "                y = layer.ffn(h)",
            "            x = x + y",
            "        x = self.norm(x)",
            f"        logits = router_logits(x.reshape(-1, {h}), {head}, {dt})",
            "        return logits.view(batch, seq, logits.shape[-1]), routing, losses"]
    if aux_free:
        out += ["", "    @torch.no_grad()", "    def update_bias(self, routing):",
                '        """Call after each optimiser step with the routing record of the forward."""',
                "        for i in self.moe_layers:",
                "            self.layers[i].moe.update_bias(routing[f'layers.{i}.tokens_per_expert'])"]
    return out


def generate_model_source(spec: ModelSpec) -> str:
    """The text of model.py for a whole model spec."""
    m = spec.model
    spec_yaml = yaml.safe_dump(model_spec_to_dict(spec), sort_keys=False).rstrip().splitlines()
    doc = [f"Model '{m.name}', generated by moe-ir from the spec below (hash {model_spec_hash(spec)}).",
           "",
           f"A decoder of {m.layers} layers; MoE layers {', '.join(map(str, m.moe_layers))}. Standalone: depends on "
           "torch only.",
           "Parameter names match weights.safetensors, e.g.",
           "    from safetensors.torch import load_file",
           "    model = DecoderModel(); model.load_state_dict(load_file('weights.safetensors'))",
           "    logits, routing, losses = model(input_ids)  # input_ids int64 [batch, seq]",
           "",
           *("    " + line for line in spec_yaml)]
    out: list[str] = ['"""' + _docstring_text("\n".join(doc)), '"""']
    out += ["import math", "", "import torch", "import torch.nn.functional as F", "from torch import nn", ""]
    out += kernel_source_lines(_needed_model_kernels(spec))
    out += PARAMS_CLASS_LINES
    out += moe_layer_class_lines(spec.moe)
    out += _attention_class(spec)
    if m.dense_layers:
        out += _dense_ffn_class(spec)
    out += _decoder_classes(spec)
    return "\n".join(out) + "\n"
