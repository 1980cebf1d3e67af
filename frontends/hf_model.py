"""Hugging Face whole models <-> moe-ir model specs and weights.

`model_spec_from_hf_config` reads the decoder keys (vocabulary, layers, attention, norms, which layers
are MoE) of the families moe-ir models exactly and takes the MoE layer from the layer importer
(`frontends/hf/config.py`), so the `moe:` section is what `moe-ir import-hf` gives for the same config.
`weights_from_hf_model` maps a causal-LM state dict (transformers' names) to the model graph's canonical
names; MoE blocks go through the layer importer's `weights_from_hf`. Both refuse what they cannot map
exactly: a key with behaviour the spec cannot express is a SpecError naming it, a tensor no weight
takes is a WeightsError listing it.

Attention per family (transformers 5.23):
  deepseek (remote code), mixtral   Llama attention; attention_bias puts biases on q, k, v and o
  qwen2_moe                         biases on q, k, v only (qkv_bias); sliding windows are refused
  olmoe                             RMSNorm over the whole q and k projections; clip_qkv is refused
  deepseek_v2, deepseek_v3          MLA; attention_bias on q_a, kv_a and o; DeepseekV2's complex RoPE and
                                    V3's rope_interleave are the interleaved layout, V3 without it the half one
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import SpecError, WeightsError
from ..interpreter import check_weights
from ..model_builder import build_model_graph
from ..model_spec import AttentionKind, ModelSpec, model_spec_from_dict
from ..spec import spec_to_dict
from .hf.config import _as_dict, describe_hf_config
from .hf.weights import weights_from_hf

__all__ = ["model_spec_from_hf_config", "weights_from_hf_model"]

_LLAMA_ATTENTION = ("deepseek", "mixtral", "qwen2_moe", "olmoe")
_MLA = ("deepseek_v2", "deepseek_v3")


def _fail(key: str, message: str, model_type: str, file: str | None) -> SpecError:
    return SpecError(f"{message} (Hugging Face {model_type} config)", path=key, file=file)


def _rope_theta(data: Mapping[str, Any], model_type: str, file: str | None) -> float:
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        key = "rope_parameters" if params.get("rope_type") else "rope_scaling"
        raise _fail(key, f"RoPE scaling '{rope_type}' is not modelled yet (it changes the rotary frequencies and, "
                         "for YaRN, the softmax scale); only plain RoPE is", model_type, file)
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    return float(theta)


def _layer_schedule(moe_layers: tuple[int, ...], num_layers: int, model_type: str, file: str | None) -> dict:
    first = moe_layers[0]
    every = moe_layers[1] - moe_layers[0] if len(moe_layers) > 1 else num_layers
    expected = tuple(range(first, num_layers, every))
    if moe_layers != expected:
        raise _fail("num_hidden_layers", f"MoE layers {list(moe_layers)} do not follow 'first k dense, then every "
                                         "n-th' (first_dense / moe_every)", model_type, file)
    return {"first_dense": first, "moe_every": every if len(moe_layers) > 1 else 1}


def model_spec_from_hf_config(config: Any, *, name: str | None = None, file: str | None = None) -> ModelSpec:
    """ModelSpec of a transformers config object or config.json dict of a supported MoE family."""
    data = _as_dict(config)
    layer_spec, info = describe_hf_config(data, file=file)
    t = info.model_type
    hidden, heads = int(data["hidden_size"]), int(data["num_attention_heads"])
    kv_heads = int(data.get("num_key_value_heads") or heads)
    model_name = name or str(data.get("_name_or_path") or t).rstrip("/").split("/")[-1] or t
    attention: dict[str, Any] = {"heads": heads, "rope_theta": _rope_theta(data, t, file)}
    bias = bool(data.get("attention_bias", False))
    if t in _MLA:
        attention.update(kind=AttentionKind.MLA.value, q_lora_rank=data.get("q_lora_rank"),
                         kv_lora_rank=data["kv_lora_rank"], qk_nope_head_dim=data["qk_nope_head_dim"],
                         qk_rope_head_dim=data["qk_rope_head_dim"], v_head_dim=data["v_head_dim"],
                         qkv_bias=bias, out_bias=bias)
        interleaved = t == "deepseek_v2" or bool(data.get("rope_interleave", True))
        attention["rope_layout"] = "interleaved" if interleaved else "half"
    else:
        attention["kind"] = AttentionKind.MHA.value if kv_heads == heads else AttentionKind.GQA.value
        if kv_heads != heads:
            attention["kv_heads"] = kv_heads
        head_dim = data.get("head_dim")
        if head_dim and int(head_dim) != hidden // heads:
            attention["head_dim"] = int(head_dim)
        if t == "qwen2_moe":
            if data.get("use_sliding_window"):
                raise _fail("use_sliding_window", "sliding-window attention is not modelled", t, file)
            attention["qkv_bias"] = bool(data.get("qkv_bias", True))
        else:
            attention.update(qkv_bias=bias, out_bias=bias)
        if t == "olmoe":
            if data.get("clip_qkv") is not None:
                raise _fail("clip_qkv", "clipping q/k/v is not modelled", t, file)
            attention["qk_norm"] = "full"
        if t == "mixtral" and data.get("sliding_window") is not None:
            raise _fail("sliding_window", "sliding-window attention is not modelled; set it to null", t, file)
    model = {"name": model_name, "source": layer_spec.source.rsplit(", layer", 1)[0],
             "vocab_size": int(data["vocab_size"]), "hidden": hidden, "layers": info.num_layers,
             "tied_embeddings": bool(data.get("tie_word_embeddings", False)),
             **_layer_schedule(info.moe_layers, info.num_layers, t, file), "attention": attention,
             "rms_norm_eps": float(data.get("rms_norm_eps", 1e-6)), "dtype": layer_spec.dtype.value}
    if len(info.moe_layers) < info.num_layers:
        model["dense_width"] = int(data["intermediate_size"])
    moe = spec_to_dict(layer_spec)
    for key in ("hidden", "dtype", "name", "source"):
        moe.pop(key, None)
    return model_spec_from_dict({"model": model, "moe": moe}, file=file)


def _hf_attention_names(spec: ModelSpec) -> dict[str, str]:
    """Canonical attention weight name (relative to `layers.i.attn.`) -> transformers name (relative to
    `model.layers.i.self_attn.`)."""
    a = spec.model.attention
    if a.kind == AttentionKind.MLA:
        names = {"w_kv_a": "kv_a_proj_with_mqa.weight", "kv_a_norm.weight": "kv_a_layernorm.weight",
                 "w_kv_b": "kv_b_proj.weight", "w_o": "o_proj.weight", "b_kv_a": "kv_a_proj_with_mqa.bias",
                 "b_o": "o_proj.bias"}
        if a.q_lora_rank is None:
            names["w_q"] = "q_proj.weight"
        else:
            names.update({"w_q_a": "q_a_proj.weight", "q_a_norm.weight": "q_a_layernorm.weight",
                          "w_q_b": "q_b_proj.weight", "b_q_a": "q_a_proj.bias"})
        return names
    names = {f"w_{k}": f"{k}_proj.weight" for k in "qkvo"}
    names.update({f"b_{k}": f"{k}_proj.bias" for k in "qkvo"})
    names.update({"q_norm.weight": "q_norm.weight", "k_norm.weight": "k_norm.weight"})
    return names


def weights_from_hf_model(state_dict: Mapping[str, torch.Tensor] | torch.nn.Module, spec: ModelSpec,
                          *, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Canonical weights of the model graph from a transformers causal-LM state dict (or the model).

    Every graph weight must be found and every tensor of the source used; WeightsError lists what is not.
    Tensors take the dtype the graph declares."""
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    sd = dict(state_dict)
    graph = build_model_graph(spec)
    m = spec.model
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(ours: str, theirs: str) -> None:
        if ours in graph.weights and theirs in sd:
            out[ours] = sd[theirs]
            used.add(theirs)

    take("embed.weight", f"{prefix}embed_tokens.weight")
    take("norm.weight", f"{prefix}norm.weight")
    if not m.tied_embeddings:
        take("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in sd:
        used.add("lm_head.weight")  # the tied copy transformers lists under both names
    attn_names = _hf_attention_names(spec)
    for i in range(m.layers):
        hf = f"{prefix}layers.{i}."
        take(f"layers.{i}.attn_norm.weight", f"{hf}input_layernorm.weight")
        take(f"layers.{i}.ffn_norm.weight", f"{hf}post_attention_layernorm.weight")
        for ours, theirs in attn_names.items():
            take(f"layers.{i}.attn.{ours}", f"{hf}self_attn.{theirs}")
        if m.is_moe_layer(i):
            block = f"{hf}block_sparse_moe." if any(k.startswith(f"{hf}block_sparse_moe.") for k in sd) else f"{hf}mlp."
            block_sd = {k: v for k, v in sd.items() if k.startswith(block)}
            for name, tensor in weights_from_hf(block_sd, spec.moe, block).items():
                out[f"layers.{i}.moe.{name}"] = tensor
            used.update(block_sd)
        else:
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                take(f"layers.{i}.ffn.{ours}", f"{hf}mlp.{theirs}.weight")
    unused = sorted(k for k in sd if k not in used)
    if unused:
        raise WeightsError(f"{len(unused)} tensors of the Hugging Face model have no place in spec '{m.name}': "
                           + ", ".join(unused[:12]) + (" ..." if len(unused) > 12 else ""))
    check_weights(graph, out)
    return {name: t.to(graph.weights[name].type.dtype.torch).contiguous() for name, t in out.items()}
