"""More transformers MoE families and the model features they need (YaRN RoPE scaling, partial rotary
embedding, ...): whole-model logits of tiny odd configurations against transformers' own model in float32
(the reference interpreter, the eager torch backend and the portable ONNX export), the dense/MoE layer pattern
against the transformers model's own modules, and greedy generation against transformers' generate.

Each tiny config is random; every weight is drawn (norms around 1, correction biases non-zero), so a weight
mapped to the wrong place or a feature left out changes the logits far beyond the tolerance.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from moe_ir.backends import get_backend
from moe_ir.errors import SpecError
from moe_ir.interpreter import interpret
from moe_ir.model_builder import build_model_graph

MODELS = Path(__file__).resolve().parent.parent / "specs" / "models"
VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
# Released DeepSeek-V3's YaRN section; V2-Lite's has mscale 0.707 for both coefficients.
V3_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _configs():
    import transformers as t

    mla = dict(kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=6, qk_nope_head_dim=8, num_key_value_heads=4)
    return {
        # released V3's YaRN over a 64-token original context, so the ramp falls inside the 2 rotary pairs
        "deepseek_v3_yarn": lambda: t.DeepseekV3Config(
            **COMMON, **mla, intermediate_size=48, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=7,
            routed_scaling_factor=2.5, q_lora_rank=12, n_group=1, topk_group=1, num_experts_per_tok=3,
            first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=2560,
            rope_parameters=dict(V3_YARN)),
        # V2-Lite's (mscale 0.707 both) plus an explicit attention_factor and no truncation
        "deepseek_v2_yarn": lambda: t.DeepseekV2Config(
            **COMMON, **mla, intermediate_size=48, moe_intermediate_size=16, n_shared_experts=2, n_routed_experts=5,
            q_lora_rank=None, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=4096,
            rope_parameters={"rope_type": "yarn", "rope_theta": 500.0, "factor": 16.0, "beta_fast": 8,
                             "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 256, "attention_factor": 1.25,
                             "truncate": False}),
        # YaRN outside DeepSeek: the cos/sin factor mscale(factor), no softmax correction
        "mixtral_yarn": lambda: t.MixtralConfig(
            **COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2, head_dim=8,
            max_position_embeddings=1024, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                           "original_max_position_embeddings": 128}),
        # OLMoE's clip_qkv at 0.6 (the q/k norms make |q|, |k| about 1, so the clamp cuts), GQA 2:1
        "olmoe_clip_qkv": lambda: t.OlmoeConfig(
            **COMMON, intermediate_size=16, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
            clip_qkv=0.6, pad_token_id=0, eos_token_id=None),
        # Llama 3's RoPE scaling outside Llama 4 (half layout): a 64-token original context puts the smoothed band
        # inside the 4 rotary pairs
        "mixtral_llama3": lambda: t.MixtralConfig(
            **COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        # -- families that fit today's layer --
        # GQA 2:1, head_dim 12 (not hidden/heads), q/k/v/o biases, a dense first layer through mlp_only_layers
        "qwen3_moe": lambda: t.Qwen3MoeConfig(
            **COMMON, intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2, head_dim=12,
            num_experts=5, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], attention_bias=True),
        # half of each head rotated (the class default), q/k norm, q/k/v biases, 3 groups keep 2
        "glm4_moe": lambda: t.Glm4MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, n_routed_experts=6,
            n_shared_experts=1, num_experts_per_tok=3, first_k_dense_replace=1, n_group=3, topk_group=2,
            routed_scaling_factor=1.7, use_qk_norm=True, attention_bias=True),
        # the options off: 3/4 of each head rotated, no q/k norm, no biases, no groups, no renormalisation
        "glm4_moe_partial_3_4": lambda: t.Glm4MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=4, n_routed_experts=5,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=2, n_group=1, topk_group=1,
            norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 5e4,
                                                   "partial_rotary_factor": 0.75}),
        # MLA with a dense layer listed in mlp_layer_types, YaRN with GLM's mscale
        "glm4_moe_lite": lambda: t.Glm4MoeLiteConfig(
            **COMMON, **mla, intermediate_size=48, moe_intermediate_size=16, q_lora_rank=12, n_routed_experts=7,
            n_shared_experts=1, num_experts_per_tok=2, routed_scaling_factor=1.8, max_position_embeddings=1024,
            mlp_layer_types=["dense", "sparse", "sparse"],
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "mscale": 1.0,
                             "mscale_all_dim": 0.5, "original_max_position_embeddings": 128}),
        # q/k RMSNorm over the whole projections, rotary_dim 4 of head_dim 8 (the released models' legacy key)
        "minimax_m2": lambda: t.MiniMaxM2Config(
            **COMMON, intermediate_size=16, num_key_value_heads=2, head_dim=8, rotary_dim=4, num_local_experts=7,
            num_experts_per_tok=3, bos_token_id=1, eos_token_id=None),
        "dots1": lambda: t.Dots1Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, n_routed_experts=6,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1,
            routed_scaling_factor=2.0, attention_bias=True),
        # softmax + correction bias, MoE layers 1 and 3 of 4 (start 1, interval 2), tied embeddings, GQA 4:1
        "ernie4_5_moe": lambda: t.Ernie4_5_MoeConfig(
            **dict(COMMON, num_hidden_layers=4, tie_word_embeddings=True), intermediate_size=40,
            moe_intermediate_size=16, num_key_value_heads=1, moe_num_experts=7, moe_k=3, moe_num_shared_experts=1,
            moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=2),
        # post-norm layers (norms on the attention and FFN outputs), q/k norm over the projections, GQA 2:1
        "flex_olmo": lambda: t.FlexOlmoConfig(
            **COMMON, intermediate_size=16, num_key_value_heads=2, num_experts=5, num_experts_per_tok=3,
            norm_topk_prob=True, pad_token_id=0, eos_token_id=None),
        # every multiplier away from 1; GQA 4:1
        "granitemoe": lambda: t.GraniteMoeConfig(
            **COMMON, intermediate_size=16, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2,
            embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2, logits_scaling=2.5,
            pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # -- sliding-window attention (windows shorter than the 9-token prompts and the 11-token generations) --
        "mixtral_sliding": lambda: t.MixtralConfig(
            **COMMON, intermediate_size=24, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=2,
            sliding_window=3),
        "qwen2_moe_sliding_layers": lambda: t.Qwen2MoeConfig(
            **COMMON, intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_key_value_heads=2, num_experts=5, num_experts_per_tok=2, use_sliding_window=True, sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        "dots1_sliding_layers": lambda: t.Dots1Config(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, num_key_value_heads=2, n_routed_experts=6,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, sliding_window=2,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
        "qwen3_moe_sliding": lambda: t.Qwen3MoeConfig(
            **COMMON, intermediate_size=40, moe_intermediate_size=16, num_key_value_heads=2, num_experts=5,
            num_experts_per_tok=2, use_sliding_window=True, sliding_window=5),
        # layers 0-2 slide over 3 tokens with RoPE, layer 3 attends globally without RoPE; q/k norm per head;
        # V3 routing with 2 groups; a dense layer listed in mlp_layer_types
        "exaone_moe": lambda: t.ExaoneMoeConfig(
            **dict(COMMON, num_hidden_layers=4), intermediate_size=40, moe_intermediate_size=16,
            num_key_value_heads=2, num_experts=6, num_shared_experts=1, num_experts_per_tok=2, n_group=2,
            topk_group=1, sliding_window=3, pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # q/k RMSNorm per head after RoPE, an ungated shared MLP, top-k per layer given as a list of equal values
        "hunyuan_v1_moe": lambda: t.HunYuanMoEV1Config(
            **COMMON, intermediate_size=16, num_key_value_heads=2, head_dim=8, num_experts=5, moe_topk=[2, 2, 2],
            attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # Granite's multipliers and an ungated shared MLP of its own width beside the block; GQA 2:1
        "granitemoeshared": lambda: t.GraniteMoeSharedConfig(
            **COMMON, intermediate_size=16, num_key_value_heads=2, num_local_experts=5, num_experts_per_tok=3,
            shared_intermediate_size=24, embedding_multiplier=2.0, residual_multiplier=0.5,
            attention_multiplier=0.3, logits_scaling=1.5, pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # sinks, layers 1 and 2 sliding over 3 tokens with RoPE, layers 0 and 3 global without (layer_rope_theta 0),
        # a shared MLP, the multipliers
        "granitemoe_swa": lambda: t.GraniteMoeSWAConfig(
            **dict(COMMON, num_hidden_layers=4), intermediate_size=16, num_key_value_heads=2, num_local_experts=5,
            num_experts_per_tok=2, shared_intermediate_size=24, sliding_window=3, layer_rope_theta=[0, 5e4, 5e4, 0],
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=1.5,
            pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # one RoPE base everywhere (the class default), the default schedule of sliding layers, no shared MLP
        "granitemoe_swa_one_theta": lambda: t.GraniteMoeSWAConfig(
            **dict(COMMON, num_hidden_layers=5), intermediate_size=16, num_key_value_heads=4, num_local_experts=3,
            num_experts_per_tok=2, sliding_window=2, pad_token_id=0, bos_token_id=1, eos_token_id=None),
        # DBRX: biasless LayerNorms, q/k/v clipped on the fused Wqkv, GQA 2:1, weights renormalised (p-norm, p = 1)
        "dbrx": lambda: t.DbrxConfig(
            d_model=32, n_heads=4, n_layers=3, vocab_size=VOCAB, max_seq_len=64,
            attn_config={"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 5e4},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 5, "moe_top_k": 2}),
        # the options off: unnormalised top-k weights, multi-head, clip_qkv 8 as released (transformers 5.24's
        # DbrxAttention needs a clip_qkv and a rope_theta in attn_config to run at all)
        "dbrx_plain": lambda: t.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64,
            attn_config={"kv_n_heads": 4, "rope_theta": 1e4, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 3, "moe_top_k": 2,
                        "moe_normalize_expert_weights": None}),
        # DBRX rotates with rope_parameters' base (attn_config's is not read by transformers 5.24): a base of its
        # own there, MQA (one kv head), top-3 of 4
        "dbrx_rope_base": lambda: t.DbrxConfig(
            d_model=32, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64,
            rope_parameters={"rope_type": "default", "rope_theta": 5e5},
            attn_config={"kv_n_heads": 1, "rope_theta": 5e5, "clip_qkv": 0.7},
            ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4, "moe_top_k": 3}),
        # PhiMoE: SparseMixer routing, LayerNorms and attention with biases, an LM head bias; GQA 4:1
        "phimoe": lambda: t.PhimoeConfig(
            **COMMON, intermediate_size=16, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2,
            attention_bias=True, lm_head_bias=True, router_jitter_noise=0.1, pad_token_id=0, eos_token_id=None),
        # gpt-oss: sinks, attention biases, clamped SwiGLU experts with biases, a router bias; sliding layers 0 and
        # 2 over 3 tokens, YaRN
        "gpt_oss": lambda: t.GptOssConfig(
            **COMMON, intermediate_size=18, num_key_value_heads=2, head_dim=10, num_local_experts=5,
            num_experts_per_tok=3, swiglu_limit=0.8, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=1024,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 8.0, "beta_fast": 32.0,
                             "beta_slow": 1.0, "original_max_position_embeddings": 128, "truncate": False},
            pad_token_id=0, eos_token_id=None),
        # the released models' "dynamic" RoPE with an alpha: a fixed NTK-alpha base, read as rope_theta
        "hunyuan_v1_moe_ntk_alpha": lambda: t.HunYuanMoEV1Config(
            **COMMON, intermediate_size=16, num_key_value_heads=1, head_dim=8, num_experts=3, moe_topk=2,
            rope_scaling={"type": "dynamic", "alpha": 50.0, "factor": 1.0}, pad_token_id=0, bos_token_id=1,
            eos_token_id=None),
    }


def _hf_model(cfg):
    from transformers import AutoModelForCausalLM

    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name.split(".")[-2]:  # the module's own name: DBRX's Wqkv sits under norm_attn_norm
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2 if p.dim() > 1 else 0.1)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
        for name, p in hf.named_parameters():  # ERNIE keeps its correction bias as a frozen parameter
            if name.endswith("e_score_correction_bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return hf


def _ids(b=2, s=9, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _imported(family):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config, weights_from_hf_model

    cfg = _configs()[family]()
    hf = _hf_model(cfg)
    spec = model_spec_from_hf_config(cfg)
    return cfg, hf, spec, weights_from_hf_model(hf, spec)


# backend -> float32 tolerance (atol relative to the logits' scale), the one the other model tests use
BACKENDS = {"reference": 2e-5, "torch": 2e-5, "onnx:portable": 5e-5}


@pytest.mark.parametrize("family", sorted(_configs()))
def test_logits_match_transformers_on_every_backend(family):
    cfg, hf, spec, weights = _imported(family)
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    graph = build_model_graph(spec)
    for name, tol in BACKENDS.items():
        if name == "reference":
            got = interpret(graph, {"input_ids": ids}, weights)["logits"]
        else:
            backend = get_backend(name)
            ok, reason = backend.supports(graph)
            assert ok, reason
            got = backend.prepare(graph, weights)(ids)["logits"]
        assert got.shape == expected.shape == (2, 9, VOCAB)
        print(f"max abs logits error {family} {name}: {float((got - expected).abs().max()):.2e}")  # -s: the table
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=tol * float(expected.abs().max()), msg=name)
        assert torch.equal(got.argmax(-1), expected.argmax(-1)), name


def _greedy_check(family, new_tokens=5):
    """Greedy tokens of the torch backend's decode graph (every MLA cache layout) equal transformers' generate
    on left-padded prompts of two lengths, and each step's logits its logits."""
    from moe_ir.generation import greedy_generate
    from moe_ir.model_builder import GraphForm, MLACacheLayout

    cfg, hf, spec, weights = _imported(family)
    prompts = _ids(2, 6, seed=4)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # the second prompt is 4 tokens, left-padded
    with torch.no_grad():
        out = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    expected = out.sequences[:, prompts.shape[1]:]
    layouts = list(MLACacheLayout) if spec.model.attention.kind.value == "mla" else [MLACacheLayout.EXPANDED]
    backend = get_backend("torch")
    for layout in layouts:
        graph = build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout)
        step = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})
        got = greedy_generate(step, graph, prompts, mask, max_new_tokens=new_tokens)
        assert torch.equal(got.tokens, expected), layout
        theirs = torch.stack(out.logits, dim=1)
        torch.testing.assert_close(got.logits.float(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


# One family per feature the decode form must carry (the logits tests above cover every family in prefill):
# YaRN with MLA (both cache layouts), partial rotary, sliding windows with NoPE global layers, multipliers,
# post-norm, a listed schedule with interleaved RoPE, sliding windows by layer_types, sinks with NoPE global layers,
# q/k/v clipping, biasless LayerNorm.
GENERATION_FAMILIES = ["deepseek_v3_yarn", "minimax_m2", "exaone_moe", "granitemoe", "flex_olmo", "ernie4_5_moe",
                       "qwen2_moe_sliding_layers", "glm4_moe", "hunyuan_v1_moe", "granitemoe_swa", "olmoe_clip_qkv",
                       "dbrx"]


@pytest.mark.parametrize("family", GENERATION_FAMILIES)
def test_greedy_generation_matches_transformers(family):
    _greedy_check(family)


def test_import_hf_model_cli_with_weights(tmp_path):
    """`moe-ir import-hf --model --weights` on folders transformers saved (sharded); the imported spec and
    weights give transformers' logits through the reference interpreter."""
    from moe_ir.cli import main
    from moe_ir.frontends import load_model_spec
    from moe_ir.params import load_weights

    # the hub names each family saves under: ERNIE's moe_statics bias, Granite's input_linear / router.layer,
    # MiniMax's block-level bias, GLM-4.7-Flash's MLA with a listed schedule, FlexOlmo's post-norm weights,
    # GraniteMoeShared's shared MLP beside the block, DBRX's transformer.blocks with fused Wqkv and expert rows
    for family in ("ernie4_5_moe", "granitemoe", "minimax_m2", "glm4_moe_lite", "flex_olmo", "hunyuan_v1_moe",
                   "granitemoeshared", "dbrx"):
        cfg = _configs()[family]()
        hf = _hf_model(cfg)
        folder = tmp_path / family
        hf.save_pretrained(folder, max_shard_size="40KB")
        spec_file, weights_file = tmp_path / f"{family}.yaml", tmp_path / f"{family}.safetensors"
        assert main(["import-hf", str(folder), "--model", "--weights", str(folder), "-o", str(spec_file),
                     "--weights-out", str(weights_file)]) == 0
        spec = load_model_spec(spec_file)
        graph = build_model_graph(spec)
        ids = _ids()
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
        got = interpret(graph, {"input_ids": ids}, load_weights(weights_file, graph))["logits"]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5 * float(expected.abs().max()), msg=family)


# Layer schedules that are not "first k dense, then every n-th": each config against transformers' modules.
def _schedule_configs():
    import transformers as t

    small = dict(COMMON, hidden_size=16, num_attention_heads=2, num_key_value_heads=2)
    return {
        # the bug this fixes: layers 1 of 3 MoE; layer 2 used to become MoE too
        "qwen2_moe_sparse_step_2": lambda: t.Qwen2MoeConfig(
            **small, intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=8,
            num_experts=3, num_experts_per_tok=2, decoder_sparse_step=2),
        "qwen2_moe_step_2_of_6": lambda: t.Qwen2MoeConfig(
            **dict(small, num_hidden_layers=6), intermediate_size=24, moe_intermediate_size=8,
            shared_expert_intermediate_size=8, num_experts=3, num_experts_per_tok=2, decoder_sparse_step=2),
        # a dense layer after an MoE layer
        "qwen3_moe_mlp_only_2": lambda: t.Qwen3MoeConfig(
            **dict(small, num_hidden_layers=4), intermediate_size=24, moe_intermediate_size=8, num_experts=3,
            num_experts_per_tok=2, mlp_only_layers=[0, 2]),
        "glm4_moe_lite_listed": lambda: t.Glm4MoeLiteConfig(
            **dict(small, num_hidden_layers=5), intermediate_size=24, moe_intermediate_size=8, n_routed_experts=3,
            n_shared_experts=1, num_experts_per_tok=2, kv_lora_rank=8, qk_rope_head_dim=4, v_head_dim=6,
            qk_nope_head_dim=8, q_lora_rank=None, mlp_layer_types=["sparse", "dense", "sparse", "sparse", "dense"]),
    }


@pytest.mark.parametrize("family", sorted(_configs()) + sorted(_schedule_configs()))
def test_dense_moe_pattern_equals_transformers_layers(family):
    """Layer by layer, MoE where transformers' model builds an MoE block (one with experts), and the parameter
    count equal (a dense layer read as MoE, or the reverse, changes it)."""
    from transformers import AutoModelForCausalLM

    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_analysis import analyse_model

    cfg = {**_configs(), **_schedule_configs()}[family]()
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg)
    layers = hf.model.layers if hasattr(hf, "model") else hf.transformer.blocks  # DBRX: transformer.blocks[i].ffn
    blocks = [getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None) or layer.ffn for layer in layers]
    theirs = [any(name.startswith("experts") for name, _ in block.named_modules()) for block in blocks]
    spec = model_spec_from_hf_config(cfg)
    assert [spec.model.is_moe_layer(i) for i in range(cfg.num_hidden_layers)] == theirs
    # ERNIE's correction bias is a frozen nn.Parameter, a buffer elsewhere: ours is never trained
    assert analyse_model(spec).trainable_params == sum(p.numel() for name, p in hf.named_parameters()
                                                       if not name.endswith("e_score_correction_bias"))


def test_yarn_changes_what_plain_rope_gives():
    """The YaRN test above is not passing by accident: the same weights under plain RoPE give other logits,
    and the softmax correction alone moves them too."""
    import dataclasses

    _, hf, spec, weights = _imported("deepseek_v3_yarn")
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    a = spec.model.attention
    for attention in (dataclasses.replace(a, rope_scaling=None),
                      dataclasses.replace(a, rope_scaling=dataclasses.replace(a.rope_scaling, softmax_mscale=False))):
        plain = dataclasses.replace(spec, model=dataclasses.replace(spec.model, attention=attention))
        got = interpret(build_model_graph(plain), {"input_ids": ids}, weights)["logits"]
        assert float((got - expected).abs().max()) > 1e-3


def test_clip_qkv_changes_what_unclipped_attention_gives():
    """The clip_qkv config above is not passing by accident: without the clamp the logits differ."""
    import dataclasses

    _, hf, spec, weights = _imported("olmoe_clip_qkv")
    assert spec.model.attention.clip_qkv == 0.6
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    a = dataclasses.replace(spec.model.attention, clip_qkv=None)
    unclipped = dataclasses.replace(spec, model=dataclasses.replace(spec.model, attention=a))
    got = interpret(build_model_graph(unclipped), {"input_ids": ids}, weights)["logits"]
    assert float((got - expected).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["mixtral_sliding", "dots1_sliding_layers"])
def test_sliding_window_changes_what_global_attention_gives(family):
    """The sliding-window tests above are not passing by accident: without the window the logits differ."""
    import dataclasses

    _, hf, spec, weights = _imported(family)
    ids = _ids()
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    a = dataclasses.replace(spec.model.attention, sliding_window=None, sliding_layers=None)
    full = dataclasses.replace(spec, model=dataclasses.replace(spec.model, attention=a))
    got = interpret(build_model_graph(full), {"input_ids": ids}, weights)["logits"]
    assert float((got - expected).abs().max()) > 1e-3


def test_yarn_numbers_by_hand():
    """The released V3 section: attention factor mscale(40, 1) / mscale(40, 1) = 1, softmax scale
    192^-0.5 (0.1 ln 40 + 1)^2; frequencies: dims below the ramp keep 1/theta^(2i/d), dims above it are
    divided by the factor."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.ir.model_ops import rope_inverse_frequencies

    cfg = _configs()["deepseek_v3_yarn"]().to_dict()
    cfg.update(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, q_lora_rank=1536,
               hidden_size=7168, num_attention_heads=128, max_position_embeddings=163840)
    cfg["rope_parameters"] = {**V3_YARN, "original_max_position_embeddings": 4096}
    spec = model_spec_from_hf_config(cfg)
    graph = build_model_graph(spec)
    attrs = next(n for n in graph.nodes if n.op.value == "mla_attention").attrs
    assert attrs["rope_attention_factor"] == 1.0
    assert attrs["softmax_scale"] == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    inv = rope_inverse_frequencies(attrs, 64, torch.float64)
    plain = 1 / 10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    # ramp ends: floor(64 ln(4096/(32 2pi)) / (2 ln 1e4)) = 10 and ceil(... beta 1 ...) = 23; strictly between
    assert torch.allclose(inv[:10], plain[:10]) and torch.allclose(inv[23:], plain[23:] / 40)
    assert bool(((inv[11:23] < plain[11:23]) & (inv[11:23] > plain[11:23] / 40)).all())


# Phi-3.5-MoE-instruct's LongRoPE factors (64 per list, one per rotary pair), as Ascend/MindSpeed-LLM's
# examples/mcore/phi35/pretrain_phi35_moe_ptd.sh writes them out
_PHI35_SHORT_FACTOR = [
    1.0, 1.0399999618530273, 1.0399999618530273, 1.0399999618530273, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.059999942779541, 1.059999942779541,
    1.0699999332427979, 1.0699999332427979, 1.0699999332427979, 1.0699999332427979, 1.1399999856948853,
    1.159999966621399, 1.159999966621399, 1.159999966621399, 1.159999966621399, 1.1799999475479126,
    1.1999999284744263, 1.3199999332427979, 1.3399999141693115, 1.3499999046325684, 1.3999998569488525,
    1.4799998998641968, 1.4999998807907104, 1.589999794960022, 1.6499998569488525, 1.71999990940094,
    1.8999998569488525, 1.9099998474121094, 1.9099998474121094, 1.9899998903274536, 1.9999998807907104,
    1.9999998807907104, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257,
    2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257,
    2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257, 2.009999990463257,
    2.0999999046325684, 2.319999933242798, 2.419999837875366, 2.5899999141693115, 2.7899999618530273]
_PHI35_LONG_FACTOR = [
    1.0199999809265137, 1.0299999713897705, 1.0399999618530273, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.059999942779541, 1.059999942779541, 1.059999942779541, 1.059999942779541, 1.059999942779541,
    1.059999942779541, 1.0999999046325684, 1.1799999475479126, 1.1799999475479126, 1.3700000047683716,
    1.4899998903274536, 2.109999895095825, 2.8899998664855957, 3.9499998092651367, 4.299999713897705,
    6.429999828338623, 8.09000015258789, 10.690000534057617, 12.050000190734863, 18.229999542236328,
    18.84000015258789, 19.899999618530273, 21.420000076293945, 26.200000762939453, 34.28000259399414,
    34.590003967285156, 38.730003356933594, 40.22000503540039, 42.54000473022461, 44.000003814697266,
    47.590003967285156, 54.750003814697266, 56.19000244140625, 57.44000244140625, 57.4900016784668, 61.20000076293945,
    61.540000915527344, 61.75, 61.779998779296875, 62.06999969482422, 63.11000061035156, 63.43000030517578,
    63.560001373291016, 63.71000289916992, 63.92000198364258, 63.94000244140625, 63.94000244140625, 63.96000289916992,
    63.980003356933594, 64.0300064086914, 64.0300064086914, 64.0300064086914, 64.04000854492188, 64.10000610351562,
    64.19000244140625, 64.20999908447266, 64.75, 64.95999908447266]

_RELEASED_YARN = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096,
                  "type": "yarn"}
RELEASED = {  # values from the released config.json files (the keys the decoder reads)
    "gpt-oss-20b.yaml": {
        "model_type": "gpt_oss", "attention_bias": True, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
        "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "rms_norm_eps": 1e-05,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 201088},
    "deepseek-v3.yaml": {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1, "norm_topk_prob": True,
        "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {**_RELEASED_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "attention_bias": False},
    "deepseek-v2-lite.yaml": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 1.0,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False, "scoring_func": "softmax",
        "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu", "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {**_RELEASED_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "attention_bias": False},
    "qwen3-30b-a3b.yaml": {
        "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936},
    "ernie-4.5-21b-a3b.yaml": {
        "model_type": "ernie4_5_moe", "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288,
        "max_position_embeddings": 131072, "num_attention_heads": 20, "num_key_value_heads": 4,
        "num_hidden_layers": 28, "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_bias": False, "vocab_size": 103424, "moe_num_experts": 64,
        "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": 27, "moe_layer_interval": 1,
        "moe_intermediate_size": 1536, "moe_k": 6},
    "minimax-m2.yaml": {
        "model_type": "minimax_m2", "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072,
        "intermediate_size": 1536, "max_position_embeddings": 196608, "num_attention_heads": 48,
        "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
        "rms_norm_eps": 1e-06, "rope_theta": 5000000, "rotary_dim": 64, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "vocab_size": 200064, "router_aux_loss_coef": 0.001},
    # The released configs of the families whose config class defaults are not the model (each spec's header
    # says where its values come from); FlexOlmo's class defaults are FlexOlmo-7x7B-1T.
    "glm-4.5-air.yaml": {
        "model_type": "glm4_moe", "attention_bias": True, "first_k_dense_replace": 1, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 10944, "max_position_embeddings": 131072,
        "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 96, "num_experts_per_tok": 8, "num_hidden_layers": 46,
        "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000, "routed_scaling_factor": 1.0,
        "tie_word_embeddings": False, "topk_group": 1, "torch_dtype": "bfloat16", "use_qk_norm": False,
        "vocab_size": 151552},
    "glm-4.7-flash.yaml": {
        "model_type": "glm4_moe_lite", "vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240,
        "moe_intermediate_size": 1536, "num_hidden_layers": 47, "num_attention_heads": 20,
        "num_key_value_heads": 20, "hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": False,
        "max_position_embeddings": 202752, "rope_theta": 1000000.0, "rope_scaling": None,
        "partial_rotary_factor": 1.0, "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
        "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 64, "n_shared_experts": 1,
        "num_experts_per_tok": 4, "norm_topk_prob": True, "routed_scaling_factor": 1.8, "n_group": 1,
        "topk_group": 1, "topk_method": "noaux_tc", "first_k_dense_replace": 1, "num_nextn_predict_layers": 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "dots.llm1.yaml": {
        "model_type": "dots1", "hidden_size": 4096, "num_hidden_layers": 62, "intermediate_size": 10944,
        "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "vocab_size": 152064,
        "first_k_dense_replace": 1, "moe_intermediate_size": 1408, "n_routed_experts": 128, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "max_position_embeddings": 32768, "rope_theta": 10000000, "scoring_func": "sigmoid",
        "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "hunyuan-a13b.yaml": {
        "model_type": "hunyuan_v1_moe", "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 3072, "moe_intermediate_size": [3072] * 32,
        "moe_topk": [8] * 32, "num_attention_heads": 32, "num_experts": 64, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_shared_expert": [1] * 32, "rms_norm_eps": 1e-05,
        "rope_scaling": {"alpha": 1000.0, "factor": 1.0, "type": "dynamic"}, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "use_cla": False, "use_mixed_mlp_moe": True, "use_qk_norm": True,
        "vocab_size": 128167, "torch_dtype": "bfloat16"},
    "flexolmo-7x7b-1t.yaml": {"model_type": "flex_olmo"},
    # DBRX's nested sections; the released JSON's integers 1, 8, 0 written as the floats transformers' strict
    # DbrxFFNConfig / DbrxAttentionConfig demand (the importer takes either)
    "dbrx.yaml": {
        "model_type": "dbrx", "d_model": 6144, "n_heads": 48, "n_layers": 40, "max_seq_len": 32768,
        "vocab_size": 100352, "attn_config": {"clip_qkv": 8.0, "kv_n_heads": 8, "rope_theta": 500000.0},
        "ffn_config": {"ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 10752, "moe_num_experts": 16,
                       "moe_top_k": 4, "moe_jitter_eps": 0.0, "moe_loss_weight": 0.05,
                       "moe_normalize_expert_weights": 1.0},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    # Phi-3.5-MoE-instruct: the keys as xinyuwei-david/david-share's Phi-3.5-MoE-and-Mini-Fine-tuning readme lists
    # them, the LongRoPE section from MindSpeed-LLM's script (above)
    "phi-3.5-moe.yaml": {
        "model_type": "phimoe", "attention_bias": True, "hidden_act": "silu", "hidden_size": 4096,
        "input_jitter_noise": 0.01, "intermediate_size": 6400, "lm_head_bias": True, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "num_local_experts": 16, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32064,
        "rope_scaling": {"type": "longrope", "short_factor": _PHI35_SHORT_FACTOR, "long_factor": _PHI35_LONG_FACTOR,
                         "short_mscale": 1.243163121016122, "long_mscale": 1.243163121016122,
                         "original_max_position_embeddings": 4096}},
    # K-EXAONE-236B-A23B: TensorRT-LLM's EXAONE_MOE_CONFIG (tests/unittest/_torch/modeling/test_modeling_exaone_moe.py,
    # the released config with 4 layers and a window of 4 for the test) with the released 48 layers and window 128
    # (the K-EXAONE README, the model card of Baekpica/k-exaone-mixed-ds4); transformers 5.24 reads neither
    # is_moe_layer nor first_last_k_dense_replace: its first_k_dense_replace default 1 is the same schedule
    "k-exaone-236b-a23b.yaml": {
        "model_type": "exaone_moe", "first_last_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 6144, "intermediate_size": 18432, "is_moe_layer": [False] + [True] * 47,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 262144, "moe_intermediate_size": 2048, "n_group": 1, "norm_topk_prob": True,
        "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 8, "num_shared_experts": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 1000000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "sliding_window": 128,
        "sliding_window_pattern": "LLLG", "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "vocab_size": 153600},
    "granite-3.0-1b-a400m.yaml": {
        "model_type": "granitemoe", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 8, "num_local_experts": 32, "num_experts_per_tok": 8, "intermediate_size": 512,
        "hidden_act": "silu", "attention_bias": False, "embedding_multiplier": 12.0,
        "attention_multiplier": 0.015625, "residual_multiplier": 0.22, "logits_scaling": 6.0,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": True,
        "vocab_size": 49155, "torch_dtype": "bfloat16"},
}


@pytest.mark.parametrize("spec_file", sorted(RELEASED))
def test_released_config_imports_as_the_shipped_spec(spec_file):
    """The shipped DeepSeek specs are the released models: YaRN included, as the importer reads it."""
    from moe_ir.frontends import load_model_spec
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_spec import model_spec_to_dict

    ours = load_model_spec(MODELS / spec_file)
    assert ours.model.attention.rope_scaling is not None or not spec_file.startswith("deepseek")
    imported = model_spec_from_hf_config(RELEASED[spec_file], name=ours.model.name)
    strip = lambda d: {**d, "model": {k: v for k, v in d["model"].items() if k != "source"}}  # noqa: E731
    assert strip(model_spec_to_dict(imported)) == strip(model_spec_to_dict(ours))


@pytest.mark.parametrize("spec_file", sorted(RELEASED))
def test_shipped_spec_parameters_equal_transformers_meta_model(spec_file):
    """Exact totals against transformers' model of the released config on the meta device (stored tensors:
    the state dict, correction-bias buffers included, inv_freq not)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from moe_ir.frontends import load_model_spec
    from moe_ir.model_analysis import analyse_model

    config = copy.deepcopy(RELEASED[spec_file])  # transformers fills nested rope sections in place
    cfg = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    ours = analyse_model(load_model_spec(MODELS / spec_file))
    stored = {name: t.numel() for name, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        stored.pop("lm_head.weight", None)
    assert ours.total_params == sum(stored.values())


# The shipped specs of the families above: each validates as its miniature (`moe-ir validate --shrink`).
SHIPPED_FAMILY_SPECS = ["glm-4.5-air.yaml", "glm-4.7-flash.yaml", "dots.llm1.yaml", "hunyuan-a13b.yaml",
                        "flexolmo-7x7b-1t.yaml", "granite-3.0-1b-a400m.yaml", "qwen3-30b-a3b.yaml",
                        "ernie-4.5-21b-a3b.yaml", "minimax-m2.yaml", "dbrx.yaml", "phi-3.5-moe.yaml",
                        "k-exaone-236b-a23b.yaml"]


@pytest.mark.parametrize("spec_file", SHIPPED_FAMILY_SPECS)
def test_shipped_family_spec_validates_shrunk(spec_file, capsys):
    """`moe-ir validate SPEC --shrink 32` on the reference, torch and portable ONNX backends: logits and every MoE
    layer's routing agree (the spec's attention, schedule and routing kept). Generation (--generate, seconds a
    spec) is left to the decode tests above, which run these families against transformers' generate."""
    import json

    from moe_ir.cli import main

    rc = main(["validate", str(MODELS / spec_file), "--shrink", "32", "--tokens", "6", "--backends", "reference",
               "torch", "onnx:portable", "--generate", "0", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"], out
    assert {r["backend"] for r in out["results"] if r["status"] == "ok"} == {"reference", "torch", "onnx:portable"}


@pytest.mark.parametrize("rope, words", [
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic NTK scaling"),
    ({"rope_type": "proportional", "factor": 2.0}, "proportional RoPE"),
    ({"type": "linear", "factor": 2.0}, "linear position interpolation"),
])
def test_rope_scalings_not_modelled_name_what_is_missing(rope, words):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    cfg = _configs()["mixtral_yarn"]().to_dict()
    cfg.pop("rope_parameters")
    cfg["rope_scaling"] = rope
    with pytest.raises(SpecError, match=words) as err:
        model_spec_from_hf_config(cfg)
    assert "supported" not in str(err.value)


@pytest.mark.parametrize("model_type, words", [
    ("sarvam_moe", "modelling implementation"), ("cohere2_moe", "parallel attention and FFN"),
    ("qwen3_vl_moe", "vision-language"), ("glm4v_moe", "mrope_section"), ("ernie4_5_vl_moe", "token type"),
    ("qwen3_omni_moe", "talker"), ("afmoe", "gate on each head"),
])
def test_families_not_modelled_name_the_missing_feature(model_type, words):
    from moe_ir.frontends.hf.config import spec_from_hf_config

    with pytest.raises(SpecError, match=words) as err:
        spec_from_hf_config({"model_type": model_type, "hidden_size": 8})
    assert err.value.path == "model_type" and "supported" not in str(err.value)


@pytest.mark.parametrize("p, words", [(2.0, "2-norm"), (0.5, "0.5-norm")])
def test_dbrx_p_norms_other_than_1_name_the_key(p, words):
    """DBRX divides the top-k weights by their p-norm: p = 1 is their sum (the renormalisation); others are not
    modelled and the error names the nested key."""
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    cfg = _configs()["dbrx"]().to_dict()
    cfg["ffn_config"] = {**cfg["ffn_config"], "moe_normalize_expert_weights": p}
    with pytest.raises(SpecError, match=words) as err:
        model_spec_from_hf_config(cfg)
    assert err.value.path == "ffn_config.moe_normalize_expert_weights"


def test_dbrx_sections_that_are_not_mappings_are_refused_by_name():
    from moe_ir.frontends.hf.config import spec_from_hf_config

    with pytest.raises(SpecError, match="expected a mapping") as err:
        spec_from_hf_config({"model_type": "dbrx", "d_model": 32, "ffn_config": [4, 2]})
    assert err.value.path == "ffn_config"


@pytest.mark.parametrize("family, changes, key, words", [
    ("qwen2_moe_sliding_layers", {"layer_types": None}, "use_sliding_window", "layer_types"),
    ("ernie4_5_moe", {"use_bias": True}, "use_bias", "LM head"),
    ("glm4_moe", {"partial_rotary_factor": 0.1}, "partial_rotary_factor", "pairs"),
    ("minimax_m2", {"router_jitter_noise": 0.1}, "router_jitter_noise", "jitter"),
    ("hunyuan_v1_moe", {"moe_topk": [2, 3, 2]}, "moe_topk", "per-layer"),
    ("granitemoe_swa", {"layer_rope_theta": [0, 5e4, 1e4, 0]}, "layer_rope_theta", "differ by layer"),
    ("granitemoe_swa", {"layer_rope_theta": [0, 0, 5e4, 5e4]}, "layer_rope_theta", "global layers"),
])
def test_options_not_modelled_name_the_key(family, changes, key, words):
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    cfg = {**_configs()[family]().to_dict(), **changes}
    cfg.get("rope_parameters", {}).pop("partial_rotary_factor", None)
    with pytest.raises(SpecError, match=words) as err:
        model_spec_from_hf_config(cfg)
    assert err.value.path == key


# export-hf for these families: each tiny config (the family's own options on) imported, exported, loaded by
# transformers, and imported back.
EXPORT_CONFIGS = {"qwen3_moe": "qwen3_moe", "glm4_moe": "glm4_moe", "glm4_moe_partial_3_4": "glm4_moe",
                  "dots1": "dots1", "ernie4_5_moe": "ernie4_5_moe", "minimax_m2": "minimax_m2",
                  "hunyuan_v1_moe": "hunyuan_v1_moe", "flex_olmo": "flex_olmo", "granitemoe": "granitemoe",
                  "granitemoeshared": "granitemoeshared", "phimoe": "phimoe", "gpt_oss": "gpt_oss",
                  "glm4_moe_lite": "glm4_moe_lite", "exaone_moe": "exaone_moe", "dbrx": "dbrx", "dbrx_plain": "dbrx",
                  "dbrx_rope_base": "dbrx",
                  "granitemoe_swa": "granitemoe_swa", "granitemoe_swa_one_theta": "granitemoe_swa"}


@pytest.mark.parametrize("config_name", sorted(EXPORT_CONFIGS))
def test_export_hf_loads_in_transformers_with_moe_ir_logits(config_name, tmp_path):
    """export-hf of an imported tiny model: `AutoModelForCausalLM.from_pretrained` on the folder loads every
    tensor, its float32 logits equal moe-ir's reference interpreter's, and import-hf of the folder gives the
    same spec back."""
    import json

    from transformers import AutoModelForCausalLM

    from moe_ir.frontends.hf.export import export_hf_checkpoint
    from moe_ir.frontends.hf.model import model_spec_from_hf_config
    from moe_ir.model_spec import model_spec_to_dict

    _, _, spec, weights = _imported(config_name)
    family, _ = export_hf_checkpoint(spec, weights, tmp_path / "out", family=EXPORT_CONFIGS[config_name])
    back, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", local_files_only=True, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = _ids()
    with torch.no_grad():
        theirs = back.eval()(input_ids=ids).logits
    ours = interpret(build_model_graph(spec), {"input_ids": ids}, weights)["logits"]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=2e-5 * float(ours.abs().max()))
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    again = model_spec_from_hf_config(config, name=spec.name)
    strip = lambda d: {**d, "model": {k: v for k, v in d["model"].items() if k != "source"}}  # noqa: E731
    assert strip(model_spec_to_dict(again)) == strip(model_spec_to_dict(spec)) and family == config["model_type"]


def test_export_hf_dbrx_without_clip_qkv_writes_null_and_says_transformers_fails():
    """A DBRX spec without clip_qkv is written as it is (clip_qkv null, read back as no clamp); transformers 5.24's
    DbrxAttention cannot run such a model, which the export's notes say."""
    import dataclasses

    from moe_ir.frontends.hf.export import hf_config_from_model_spec
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    _, _, spec, _ = _imported("dbrx")
    attention = dataclasses.replace(spec.model.attention, clip_qkv=None)
    unclipped = dataclasses.replace(spec, model=dataclasses.replace(spec.model, attention=attention))
    family, config, notes = hf_config_from_model_spec(unclipped)
    assert family == "dbrx" and config["attn_config"]["clip_qkv"] is None
    assert model_spec_from_hf_config(config).model.attention.clip_qkv is None
    assert any("fails without a clip_qkv" in n for n in notes)
    assert config["attn_config"]["rope_theta"] == config["rope_parameters"]["rope_theta"] == 1e4


def _hf_moe_output(family, hf, layer, x):
    """transformers' MoE output of decoder layer `layer` on x [B, S, H]: its block, plus the shared MLP that
    GraniteMoeShared and GraniteMoeSWA run beside it in the decoder layer."""
    if family == "dbrx":
        return hf.transformer.blocks[layer].ffn(x).reshape(x.shape)
    decoder = hf.model.layers[layer]
    block = getattr(decoder, "block_sparse_moe", None) or decoder.mlp
    out = block(x)
    out = (out[0] if isinstance(out, tuple) else out).reshape(x.shape)
    return out + decoder.shared_mlp(x) if getattr(decoder, "shared_mlp", None) is not None else out


@pytest.mark.parametrize("family", ["hunyuan_v1_moe", "granitemoe", "minimax_m2", "ernie4_5_moe", "dbrx",
                                    "granitemoeshared", "granitemoe_swa"])
def test_import_hf_layer_weights_read_the_family_names(family, tmp_path):
    """`moe-ir import-hf FOLDER --weights FOLDER` (one MoE layer) on a checkpoint transformers saved finds the
    family's own router / bias / shared-MLP names (Hunyuan's gate.wg and shared_mlp, Granite's router.layer,
    MiniMax's block-level and ERNIE's moe_statics correction bias, DBRX's transformer.blocks.N.ffn with its
    router.layer and expert rows, GraniteMoeShared's and GraniteMoeSWA's shared MLP beside the block); the
    tensors equal the layer's in the whole-model import, whose logits equal transformers' above, and the layer's
    output on those weights equals transformers' block."""
    from moe_ir.builder import build_graph
    from moe_ir.cli import main
    from moe_ir.frontends import load_spec
    from moe_ir.params import load_weights

    cfg, hf, spec, weights = _imported(family)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--weights", str(tmp_path / "hf"), "-o", str(tmp_path / "l.yaml"),
                 "--weights-out", str(tmp_path / "l.safetensors")]) == 0
    layer_spec = load_spec(tmp_path / "l.yaml")
    graph = build_graph(layer_spec)
    got = load_weights(tmp_path / "l.safetensors", graph)
    first = spec.model.moe_layers[0]
    assert got and all(torch.equal(t, weights[f"layers.{first}.moe.{name}"].to(t.dtype)) for name, t in got.items())
    x = torch.randn(2, 5, layer_spec.hidden, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = _hf_moe_output(family, hf, first, x)
    ours = interpret(graph, {"x": x}, got)["out"]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=2e-5 * float(expected.abs().max()))
