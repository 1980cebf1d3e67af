"""moe-ir against transformers' own MoE blocks: import a small random block's config and weights, run the
reference interpreter, compare outputs, routing, balance losses and parameter counts.

transformers is the independent oracle here (random weights, configs built in the test, no download).
Tolerances: float32 outputs within 1e-5 x the output scale and identical routing; bfloat16 (the block
run in bf16, the interpreter in float32 on the same bf16 weights) within 2e-2 x the output scale,
identical routing for DeepSeek (float32 router in both), and for Mixtral/Qwen2-MoE/OLMoE (whose
routers project in bf16) a routing difference only on near-tied experts.
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig  # noqa: E402
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe  # noqa: E402
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402
from transformers.models.mixtral import modeling_mixtral  # noqa: E402
from transformers.models.olmoe import modeling_olmoe  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe  # noqa: E402

from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import WeightsError  # noqa: E402
from moe_ir.frontends.hf import (HFLayout, hf_layer_prefix, read_hf_tensors, spec_from_hf_config,  # noqa: E402
                                 weights_from_hf, weights_to_hf)
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.params import save_weights  # noqa: E402
from moe_ir.spec import GroupScore, ScoreFn  # noqa: E402

H = 64
SMALL = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)


def _v2(**kw):
    base = dict(moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
                first_k_dense_replace=0)
    return DeepseekV2Config(**SMALL, **{**base, **kw})


def _v3(**kw):
    base = dict(moe_intermediate_size=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                n_group=4, topk_group=2, first_k_dense_replace=0)
    return DeepseekV3Config(**SMALL, **{**base, **kw})


# name -> (transformers config, block class, model_type override for the import or None)
FAMILIES = {
    # deepseek-moe-16b semantics (softmax, greedy, no renormalisation, no scaling) = DeepseekV2Moe greedy;
    # imported through the remote-code 'deepseek' family.
    "deepseek": (_v2(), DeepseekV2Moe, "deepseek"),
    "v2-greedy-scaled": (_v2(routed_scaling_factor=2.0), DeepseekV2Moe, None),
    "v2-group-limited": (_v2(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0),
                         DeepseekV2Moe, None),
    "v3-norm": (_v3(), DeepseekV3MoE, None),
    "v3-unnormalized": (_v3(norm_topk_prob=False, routed_scaling_factor=1.5, n_shared_experts=2), DeepseekV3MoE, None),
    "v3-no-groups": (_v3(n_group=1, topk_group=1), DeepseekV3MoE, None),
    "mixtral": (MixtralConfig(**{**SMALL, "num_key_value_heads": 2}, intermediate_size=48, num_local_experts=8,
                              num_experts_per_tok=2), modeling_mixtral.MixtralSparseMoeBlock, None),
    "qwen2-moe": (Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=96, num_experts=16,
                                 num_experts_per_tok=4), modeling_qwen2_moe.Qwen2MoeSparseMoeBlock, None),
    "qwen2-moe-norm": (Qwen2MoeConfig(**SMALL, moe_intermediate_size=32, shared_expert_intermediate_size=96,
                                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=True),
                       modeling_qwen2_moe.Qwen2MoeSparseMoeBlock, None),
    "olmoe": (OlmoeConfig(**SMALL, intermediate_size=32, num_experts=32, num_experts_per_tok=8),
              modeling_olmoe.OlmoeSparseMoeBlock, None),
}
DEEPSEEK_FAMILIES = {n for n, (_, cls, _) in FAMILIES.items() if cls in (DeepseekV2Moe, DeepseekV3MoE)}


def _config_dict(name: str, dtype: torch.dtype) -> dict:
    cfg, _, model_type = FAMILIES[name]
    d = cfg.to_dict()
    d["dtype"] = str(dtype).removeprefix("torch.")
    if model_type == "deepseek":
        # The remote-code config of deepseek-moe-16b: no V2-only keys, its own aux-loss keys.
        for key in ("topk_method", "n_group", "topk_group", "routed_scaling_factor"):
            d.pop(key, None)
        d.update(model_type="deepseek", scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=False)
    return d


def _block(name: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The transformers block with seeded random weights; DeepSeek-V3's correction bias random too."""
    cfg, cls, _ = FAMILIES[name]
    torch.manual_seed(seed)
    block = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in block.named_parameters():
            fan_in = p.shape[-1]
            p.normal_(0.0, 1.0 / math.sqrt(fan_in))
        for _, b in block.named_buffers():
            # Mixed signs: some biased scores go negative, which exercises the -inf group masking
            # (transformers 5.23's V3 router masks with -inf too, so any bias is a fair test).
            b.uniform_(-0.3, 0.3)
    return block.to(dtype)


def _routing_sets(idx: torch.Tensor) -> list[frozenset]:
    return [frozenset(row.tolist()) for row in idx]


def _hf_routing(block: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        logits, weights, idx = block.gate(x.reshape(-1, x.shape[-1]))
    return logits, weights, idx


def _run_both(name: str, dtype: torch.dtype, seed: int = 0):
    block = _block(name, dtype, seed)
    spec = spec_from_hf_config(_config_dict(name, dtype))
    weights = weights_from_hf(block, spec)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(2, 48, H, generator=gen).to(dtype)
    with torch.no_grad():
        ref = block(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    return block, spec, weights, x, ref, ours


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float32_matches_transformers(name):
    block, spec, _, x, ref, ours = _run_both(name, torch.float32)
    _, hf_weights, hf_idx = _hf_routing(block, x)
    assert _routing_sets(ours["expert_idx"]) == _routing_sets(hf_idx)
    # Gate weights per (token, expert), order-free: transformers returns top-k unsorted.
    ours_w = torch.zeros(hf_idx.shape[0], spec.experts.routed).scatter_(1, ours["expert_idx"], ours["weights"])
    hf_w = torch.zeros_like(ours_w).scatter_(1, hf_idx, hf_weights.float())
    torch.testing.assert_close(ours_w, hf_w, rtol=1e-6, atol=1e-6)
    if spec.router.group_limit is not None or spec.balance.aux_free is not None:
        # The group limit / correction bias must change some token's experts, or the case tests nothing.
        logits = torch.nn.functional.linear(x.reshape(-1, H), block.gate.weight)
        scores = logits.softmax(-1) if spec.router.score == ScoreFn.SOFTMAX else logits.sigmoid()
        plain = scores.topk(spec.experts.top_k, dim=-1).indices
        assert _routing_sets(plain) != _routing_sets(hf_idx)
    scale = ref.abs().max().item()
    err = (ours["out"] - ref).abs().max().item()
    print(f"{name} float32: max|err| {err:.3g} (output scale {scale:.3g})")
    assert err <= 1e-5 * scale


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_bfloat16_matches_transformers(name):
    block, spec, weights, x, ref, ours = _run_both(name, torch.bfloat16)
    _, _, hf_idx = _hf_routing(block, x)
    hf_sets, our_sets = _routing_sets(hf_idx), _routing_sets(ours["expert_idx"])
    same = torch.tensor([a == b for a, b in zip(hf_sets, our_sets)])
    if name in DEEPSEEK_FAMILIES:
        assert same.all(), "DeepSeek routes in float32 in both, so routing must be identical in bf16"
    else:
        # transformers rounds these routers' logits to bf16; the spec keeps them in float32. A token may
        # then differ only by swapping experts whose float32 logits are within bf16 rounding of each other.
        logits32 = torch.nn.functional.linear(x.reshape(-1, H).float(), weights["router.weight"].float())
        for t in torch.nonzero(~same).flatten().tolist():
            tol = 2.0 ** -7 * logits32[t].abs().max().item()
            for a in hf_sets[t] - our_sets[t]:
                for b in our_sets[t] - hf_sets[t]:
                    assert abs(logits32[t, a] - logits32[t, b]).item() <= tol, f"token {t}: not a near-tie"
        assert (~same).sum().item() <= max(2, same.numel() // 20)
    same_tokens = same.view(x.shape[0], x.shape[1])
    diff = (ours["out"] - ref.float()).abs()[same_tokens]
    scale = ref.float().abs().max().item()
    err = diff.max().item()
    print(f"{name} bfloat16: max|err| {err:.3g} (output scale {scale:.3g}), routing differs on "
          f"{(~same).sum().item()} of {same.numel()} tokens")
    assert err <= 2e-2 * scale


def test_routing_variants_are_the_ones_named():
    """The families above cover what the issue lists; pin it so a config change cannot drop a variant."""
    specs = {name: spec_from_hf_config(_config_dict(name, torch.float32)) for name in FAMILIES}
    routers = [s.router for s in specs.values()]
    assert {r.score for r in routers} == {ScoreFn.SOFTMAX, ScoreFn.SIGMOID}
    assert {r.group_limit.score for r in routers if r.group_limit} == {GroupScore.MAX, GroupScore.TOP2_SUM}
    assert any(r.group_limit is None for r in routers)
    assert {r.normalize for r in routers} == {True, False}
    assert {r.scaling for r in routers} >= {1.0, 1.5, 2.0, 2.5, 16.0}
    assert specs["v3-unnormalized"].experts.shared == 2 and specs["qwen2-moe"].experts.shared_gate


def _block_param_count(block: torch.nn.Module) -> int:
    # Buffers count too: DeepSeek-V3's e_score_correction_bias is the spec's router.bias.
    return sum(p.numel() for p in block.parameters()) + sum(b.numel() for b in block.buffers())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_parameter_count_matches_block(name):
    block = _block(name, torch.float32)
    spec = spec_from_hf_config(_config_dict(name, torch.float32))
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    assert analyse(spec).total_params == graph_total == _block_param_count(block)


# ------------------------------------------------------------------------------------------------
# balance losses


@pytest.mark.parametrize("name, module", [("mixtral", modeling_mixtral), ("qwen2-moe", modeling_qwen2_moe),
                                          ("olmoe", modeling_olmoe)])
def test_expert_loss_equals_transformers_load_balancing_loss(name, module):
    cfg = FAMILIES[name][0]
    block, spec, weights, x, _, _ = _run_both(name, torch.float32)
    ours = interpret(build_graph(spec, training=True), {"x": x}, weights)
    logits, _, _ = _hf_routing(block, x)
    torch.testing.assert_close(ours["router_logits"], logits, rtol=0, atol=0)
    k = cfg.num_experts_per_tok
    num_experts = spec.experts.routed
    hf = cfg.router_aux_loss_coef * module.load_balancing_loss_func((logits,), num_experts, k)
    assert spec.balance.expert == pytest.approx(cfg.router_aux_loss_coef * k)
    torch.testing.assert_close(ours["loss.expert"], hf.to(torch.float32), rtol=1e-6, atol=1e-9)
    assert ours["aux_loss"].item() == pytest.approx(hf.item(), rel=1e-6)


def _deepseek_remote_aux_loss(scores: torch.Tensor, idx: torch.Tensor, batch: int, alpha: float, seq_aux: bool):
    """The DeepSeek remote-code MoEGate training loss, written out from its published formula."""
    t, e = scores.shape
    k = idx.shape[1]
    seq = t // batch
    if seq_aux:
        counts = torch.zeros(batch, e).scatter_add_(1, idx.view(batch, -1), torch.ones(batch, seq * k))
        ce = counts / (seq * k / e)
        return (ce * scores.view(batch, seq, e).mean(dim=1)).sum(dim=1).mean() * alpha
    ce = torch.nn.functional.one_hot(idx.reshape(-1), e).float().mean(0)
    return (scores.mean(0) * ce * e).sum() * alpha


@pytest.mark.parametrize("name, seq_aux", [("deepseek", False), ("v2-group-limited", True)])
def test_deepseek_aux_loss_equals_remote_formula(name, seq_aux):
    d = _config_dict(name, torch.float32)
    d.update(aux_loss_alpha=0.003, seq_aux=seq_aux)
    spec = spec_from_hf_config(d)
    kind = "sequence" if seq_aux else "expert"
    assert spec.balance.losses == {kind: 0.003}
    block = _block(name, torch.float32)
    weights = weights_from_hf(block, spec)
    x = torch.randn(3, 20, H, generator=torch.Generator().manual_seed(5))
    ours = interpret(build_graph(spec, training=True), {"x": x}, weights)
    _, _, hf_idx = _hf_routing(block, x)
    assert _routing_sets(ours["expert_idx"]) == _routing_sets(hf_idx)
    scores = ours["router_logits"].softmax(dim=-1)
    want = _deepseek_remote_aux_loss(scores, hf_idx, 3, 0.003, seq_aux)
    torch.testing.assert_close(ours[f"loss.{kind}"], want, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# weights: layouts, files, errors


@pytest.mark.parametrize("name", ["v3-unnormalized", "qwen2-moe", "mixtral"])
@pytest.mark.parametrize("layout", list(HFLayout))
def test_weights_round_trip_every_layout(name, layout):
    block = _block(name, torch.float32)
    spec = spec_from_hf_config(_config_dict(name, torch.float32))
    canonical = weights_from_hf(block, spec)
    hf = weights_to_hf(canonical, spec, layout)
    assert weights_from_hf(hf, spec).keys() == canonical.keys()
    again = weights_from_hf(hf, spec, layout=layout)
    for key, t in canonical.items():
        assert torch.equal(again[key], t), key
    # Back to transformers' own module, strictly.
    fresh = FAMILIES[name][1](FAMILIES[name][0])
    fresh.load_state_dict(weights_to_hf(canonical, spec), strict=True)
    for key, t in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], t), key


def test_shared_experts_split_exactly():
    """DeepSeek's fused shared MLP of width n_shared*F equals the sum of the spec's n_shared experts."""
    block = _block("v3-unnormalized", torch.float64)
    spec = spec_from_hf_config(_config_dict("v3-unnormalized", torch.float32))
    assert (spec.experts.shared, spec.experts.shared_ffn_width) == (2, 32)
    w = weights_from_hf(block, spec, cast=False)
    x = torch.randn(10, H, dtype=torch.float64)
    silu = torch.nn.functional.silu
    pieces = sum((silu(x @ w[f"shared.{i}.w_gate"].T) * (x @ w[f"shared.{i}.w_up"].T)) @ w[f"shared.{i}.w_down"].T
                 for i in range(2))
    with torch.no_grad():
        fused = block.shared_experts(x)
    torch.testing.assert_close(pieces, fused, rtol=1e-12, atol=1e-12)


def test_weights_from_safetensors_checkpoint_with_prefix_and_index(tmp_path):
    """A per-expert checkpoint split over two shards with an index, plus unrelated tensors."""
    block = _block("v2-group-limited", torch.bfloat16)
    spec = spec_from_hf_config(_config_dict("v2-group-limited", torch.bfloat16))
    canonical = weights_from_hf(block, spec)
    layer = 1
    prefix = hf_layer_prefix(layer)
    hf = weights_to_hf(canonical, spec, HFLayout.PER_EXPERT, prefix=prefix)
    names = sorted(hf)
    half = len(names) // 2
    shard1 = {k: hf[k] for k in names[:half]} | {"model.embed_tokens.weight": torch.zeros(5, H)}
    shard2 = {k: hf[k] for k in names[half:]} | {f"model.layers.{layer}.self_attn.o_proj.weight": torch.zeros(H, H)}
    save_weights(shard1, tmp_path / "model-00001-of-00002.safetensors")
    save_weights(shard2, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in shard1}
             | {k: "model-00002-of-00002.safetensors" for k in shard2}}
    (tmp_path / "model.safetensors.index.json").write_text(__import__("json").dumps(index))
    for source in (tmp_path, tmp_path / "model.safetensors.index.json",
                   [tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"]):
        got = weights_from_hf(source, spec, prefix)
        assert got.keys() == canonical.keys()
        for key, t in canonical.items():
            assert got[key].dtype == t.dtype and torch.equal(got[key], t), key
    # Experts keep the checkpoint's bf16; the router is widened (exactly) to the spec's float32 router dtype.
    assert canonical["experts.w_up"].dtype == torch.bfloat16 and canonical["router.weight"].dtype == torch.float32
    # The imported weights save as canonical safetensors (slices own their storage).
    save_weights(canonical, tmp_path / "canonical.safetensors")


def test_mixtral_hub_checkpoint_names(tmp_path):
    block = _block("mixtral", torch.float32)
    spec = spec_from_hf_config(_config_dict("mixtral", torch.float32))
    canonical = weights_from_hf(block, spec)
    prefix = hf_layer_prefix(0, HFLayout.PER_EXPERT_W123)
    assert prefix == "model.layers.0.block_sparse_moe."
    hf = weights_to_hf(canonical, spec, HFLayout.PER_EXPERT_W123, prefix=prefix)
    assert f"{prefix}experts.7.w2.weight" in hf and hf[f"{prefix}experts.7.w2.weight"].shape == (H, 48)
    save_weights(hf, tmp_path / "model.safetensors")
    assert sorted(read_hf_tensors(tmp_path / "model.safetensors", prefix)) == sorted(k[len(prefix):] for k in hf)
    got = weights_from_hf(tmp_path / "model.safetensors", spec, prefix)
    assert all(torch.equal(got[k], canonical[k]) for k in canonical)


def test_mismatched_weights_list_every_problem():
    block = _block("v3-norm", torch.float32)
    spec = spec_from_hf_config(_config_dict("v3-norm", torch.float32))
    sd = dict(block.state_dict())
    del sd["gate.e_score_correction_bias"]
    sd["experts.down_proj"] = sd["experts.down_proj"][:, :, :16]
    sd["experts.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        weights_from_hf(sd, spec)
    msg = str(err.value)
    assert "missing: gate.e_score_correction_bias" in msg
    assert "unexpected: experts.extra" in msg
    assert "experts.down_proj: expected [16, 64, 32], found [16, 64, 16]" in msg


def test_weights_for_another_spec_are_refused():
    block = _block("qwen2-moe", torch.float32)
    other = spec_from_hf_config(_config_dict("olmoe", torch.float32))
    with pytest.raises(WeightsError, match="unexpected: shared_expert.down_proj.weight"):
        weights_from_hf(block, other)
    with pytest.raises(WeightsError, match="no tensors under prefix 'model.layers.9.mlp.'"):
        weights_from_hf(block, other, "model.layers.9.mlp")


def test_quantized_checkpoint_gets_a_hint():
    block = _block("v3-norm", torch.float32)
    spec = spec_from_hf_config(_config_dict("v3-norm", torch.float32))
    sd = weights_to_hf(weights_from_hf(block, spec), spec, HFLayout.PER_EXPERT)
    sd["experts.0.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
    with pytest.raises(WeightsError, match="quantized tensors: dequantize"):
        weights_from_hf(sd, spec)
