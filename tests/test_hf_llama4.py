"""Llama 4 (text)'s MoE layer: the sigmoid router weight multiplying the chosen expert's input
(router.scale_input -> grouped_ffn row_scale + an unweighted combine -> reference) and the shared expert,
against transformers' Llama4TextMoe; its import (config keys, MoE layer schedule, weights both ways in the
[E, in, out] layout), the backends that lower it, the refusals of the ones that cannot, and the whole-model
import refused by the features it needs.

transformers is the independent oracle (random weights, tiny odd configs built here, no download).
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Llama 4 equivalence tests need transformers "
                                                          "(the `hf` / `test` extra)")
from transformers import Llama4TextConfig  # noqa: E402
from transformers.models.llama4.modeling_llama4 import Llama4TextMoe  # noqa: E402

from moe_ir.analysis import analyse  # noqa: E402
from moe_ir.backends import get_backend, resolve_backends  # noqa: E402
from moe_ir.builder import build_graph  # noqa: E402
from moe_ir.errors import SpecError  # noqa: E402
from moe_ir.frontends.hf import (FAMILY_DEFAULTS, describe_hf_config, spec_from_hf_config,  # noqa: E402
                                 weights_from_hf, weights_to_hf)
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.ir import to_text  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import ScoreFn, spec_from_dict  # noqa: E402
from moe_ir.validate import validate  # noqa: E402

H = 28


def _config(**kw) -> Llama4TextConfig:
    # Odd sizes: 5 experts of width 18, top-2 (the released models route top-1), 3 layers.
    base = dict(hidden_size=H, intermediate_size=18, intermediate_size_mlp=30, num_local_experts=5,
                num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_hidden_layers=3)
    return Llama4TextConfig(**{**base, **kw})


def _block(cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    block = Llama4TextMoe(cfg).eval()
    with torch.no_grad():
        for _, p in block.named_parameters():
            p.normal_(0.0, 1.0 / math.sqrt(H))
    return block


@pytest.mark.parametrize("k", [1, 2])
def test_layer_matches_transformers(k):
    cfg = _config(num_experts_per_tok=k)
    block = _block(cfg)
    spec = spec_from_hf_config(cfg)
    assert spec.router.scale_input and spec.router.score == ScoreFn.SIGMOID and spec.experts.shared == 1
    weights = weights_from_hf(block, spec)
    x = torch.randn(2, 17, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, logits = block(x)
    ours = interpret(build_graph(spec), {"x": x}, weights)
    chosen = logits.topk(k, dim=-1)
    assert torch.equal(ours["expert_idx"], chosen.indices)
    torch.testing.assert_close(ours["weights"], chosen.values.sigmoid(), rtol=1e-6, atol=1e-7)
    err = (ours["out"].reshape(-1, H) - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    # Weighing the outputs instead (every other family) gives another layer: the test tells them apart.
    output_weighted = spec_from_dict({"hidden": H, "experts": {"routed": 5, "width": 18, "top_k": k, "shared": 1},
                                      "router": {"score": "sigmoid"}})
    other = interpret(build_graph(output_weighted), {"x": x}, weights)["out"].reshape(-1, H)
    assert (other - ref).abs().max() > 1e-2


def test_backends_match_the_reference_or_say_why_not():
    cfg = _config()
    spec = spec_from_hf_config(cfg)
    report = validate(spec, resolve_backends(["reference", "torch", "onnx:portable"]), tokens=19, batch=2, seed=4,
                      weights=weights_from_hf(_block(cfg, seed=2), spec))
    assert report.ok, [r.to_dict() for r in report.results]
    assert all(r.status == "ok" and r.routing.flips == 0 for r in report.results)
    for name, fragment in (("onnx:ort", "router.scale_input"), ("triton", "router.scale_input"),
                           ("tensorrt", "router.scale_input"), ("onnx:plugin", "router.scale_input"),
                           ("expert_parallel:2", "router.scale_input")):
        backend = get_backend(name)
        graph = run_pipeline(build_graph(spec), backend.pipeline)
        try:
            ok, reason = backend.supports(graph)
        except Exception as err:  # noqa: BLE001 - an unavailable backend says so by raising
            pytest.skip(f"{name}: {err}")
        assert not ok and fragment in reason, (name, reason)
    # The new operand and attribute show only where they are used.
    text = to_text(build_graph(spec))
    assert "weighted=false" in text
    plain = to_text(build_graph(spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 2}})))
    assert "weighted" not in plain


def test_weights_round_trip_schedule_and_parameter_count():
    cfg = _config(interleave_moe_layer_step=2, num_hidden_layers=5)
    block = _block(cfg, seed=1)
    spec, info = describe_hf_config(cfg)
    assert info.moe_layers == (1, 3)
    canonical = weights_from_hf(block, spec)
    fresh = Llama4TextMoe(cfg)
    fresh.load_state_dict(weights_to_hf(canonical, spec), strict=True)
    for name, t in block.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    graph_total = sum(math.prod(v.type.shape) for v in build_graph(spec).weights.values())
    assert analyse(spec).total_params == graph_total == sum(p.numel() for p in block.parameters())
    assert describe_hf_config(_config(moe_layers=[0, 2]))[1].moe_layers == (0, 2)


def test_defaults_and_refusals():
    from moe_ir.frontends.hf.model import model_spec_from_hf_config

    defaults = Llama4TextConfig().to_dict()
    for key, value in FAMILY_DEFAULTS["llama4_text"].items():
        assert defaults[key] == value or (key == "moe_layers" and value is None), key
    with pytest.raises(SpecError) as err:
        spec_from_hf_config(_config(router_jitter_noise=0.1))
    assert err.value.path == "router_jitter_noise"
    with pytest.raises(SpecError, match="chunked attention") as err:
        model_spec_from_hf_config(_config())
    assert err.value.path == "attention_chunk_size"
    with pytest.raises(SpecError) as err:
        spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 4, "top_k": 2},
                        "router": {"scale_input": True, "choice": "expert"}})
    assert err.value.path == "router.scale_input"
