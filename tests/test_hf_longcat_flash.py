"""LongCat-Flash's MoE block: zero-computation (identity) experts among the routed ones (experts.identity ->
grouped_ffn identity_experts -> reference) with softmax scores, selection on scores + correction bias and the
routed scaling, against transformers' LongcatFlashMoE; its import (config keys and aliases, weights both ways,
the identity experts' unused gate_up_proj rows), the backends that lower it and the refusals of the others.

The whole model (two attention blocks and two FFN paths per layer) is not modelled: the model importer refuses
the family by name. transformers is the independent oracle (random weights, tiny odd configs, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the LongCat-Flash equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import LongcatFlashConfig  # noqa: E402
from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashMoE  # noqa: E402

from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import FAMILY_DEFAULTS, spec_from_hf_config, weights_from_hf, weights_to_hf  # noqa: E402
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 24


def _config(**kw) -> LongcatFlashConfig:
    # Odd sizes: 5 FFN experts + 3 identity experts, width 14, top-3.
    base = dict(hidden_size=H, expert_ffn_hidden_size=14, n_routed_experts=5, zero_expert_num=3, moe_topk=3,
                routed_scaling_factor=1.7, num_layers=2, num_attention_heads=4, kv_lora_rank=8, q_lora_rank=8,
                qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, ffn_hidden_size=20)
    return LongcatFlashConfig(**{**base, **kw})


def _block(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = LongcatFlashMoE(cfg).eval()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(H))
        block.router.e_score_correction_bias.uniform_(-0.1, 0.1)
    return block


def _sets(idx):
    return [frozenset(row.tolist()) for row in idx]


def test_layer_matches_transformers():
    cfg = _config()
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    assert spec.experts.identity == 3 and spec.experts.routed == 5 and spec.balance.aux_free is not None
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 23, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = block(x)
        _, hf_w, hf_idx = block.router(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    assert _sets(ours["expert_idx"]) == _sets(hf_idx)
    picks = ours["expert_idx"]
    assert (picks >= 5).any() and (picks < 5).any(), "the case must route to identity and FFN experts both"
    ours_w = torch.zeros(hf_idx.shape[0], 8).scatter_(1, picks, ours["weights"])
    torch.testing.assert_close(ours_w, torch.zeros_like(ours_w).scatter_(1, hf_idx, hf_w), rtol=1e-6, atol=1e-7)
    err = (ours["out"] - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


def test_backends_match_the_reference_or_say_why_not():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable"]), tokens=19, batch=2, seed=4,
                      weights=weights_from_hf(_block(cfg, seed=2), spec))
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" for r in report.results)
    for name in ("onnx:ort", "triton", "tensorrt", "onnx:plugin", "expert_parallel:2"):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and "identity experts" in reason, (name, reason)


def test_weights_round_trip_and_parameter_count():
    cfg = _config()
    block = _block(cfg, seed=1)
    spec = spec_from_hf_config(cfg)
    canonical = weights_from_hf(block, spec)
    back = weights_to_hf(canonical, spec)
    for name, t in block.state_dict().items():
        if name == "experts.gate_up_proj":  # the identity experts' rows are never read: exported as zeros
            assert torch.equal(back[name][:5], t[:5]) and not back[name][5:].any()
        else:
            assert torch.equal(back[name], t), name
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    unused = 3 * 2 * 14 * H  # transformers' gate_up_proj rows of the identity experts
    block_total = sum(p.numel() for p in block.parameters()) + sum(b.numel() for b in block.buffers())
    assert analyse(spec).total_params == graph_total == block_total - unused


def test_defaults_aliases_and_refusals():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    defaults = LongcatFlashConfig().to_dict()
    assert all(defaults[k] == v for k, v in FAMILY_DEFAULTS["longcat_flash"].items())
    via_alias = {k: v for k, v in _config().to_dict().items() if k not in ("n_routed_experts", "moe_topk")}
    via_alias.update(num_local_experts=5, num_experts_per_tok=3)
    assert spec_from_hf_config(via_alias).experts == spec_from_hf_config(_config()).experts
    with pytest.raises(SpecError) as err:
        spec_from_hf_config({**_config().to_dict(), "router_bias": True})
    assert err.value.path == "router_bias"
    with pytest.raises(SpecError, match="two attention blocks") as err:
        model_spec_from_hf_config(_config())
    assert err.value.path == "num_layers"
    for changes, path in (({"router": {"choice": "expert"}}, "experts.identity"),
                          ({"capacity": {"factor": 1.0}}, "experts.identity"),
                          ({"experts": {"routed": 2, "identity": 1, "width": 4, "top_k": 4}}, "experts.top_k")):
        data = {"hidden": 8, "experts": {"routed": 4, "identity": 2, "width": 4, "top_k": 2}, **changes}
        with pytest.raises(SpecError) as err:
            spec_from_dict(data)
        assert err.value.path == path
