"""The `compile` backend (torch.compile of the eager module, inductor, one graph, dynamic token count,
frozen weights) against the reference interpreter: one compilation (~15 s on 2 cores) serves several
token counts and routings, with no recompilation."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from moe_ir.backends import get_backend
from moe_ir.backends.compile import compile_settings
from moe_ir.builder import build_graph
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights
from moe_ir.spec import spec_from_dict


def test_compiled_runner_matches_reference_on_dynamic_token_counts_without_recompiling():
    spec = spec_from_dict({"hidden": 16, "experts": {"routed": 8, "width": 8, "top_k": 2, "shared": 1},
                           "router": {"score": "sigmoid", "normalize": True}, "balance": {"aux_free": {}}})
    graph = build_graph(spec)
    weights = init_weights(graph, 0)
    weights["router.bias"] = torch.linspace(-0.1, 0.1, 8)
    backend = get_backend("compile")
    assert backend.supports(graph) == (True, "")
    runner = backend.prepare(graph, weights)
    packed_before = counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"]
    empty_expert_seen = False
    for i, tokens in enumerate((5, 11, 2, 64)):
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
        # After the first call, a new token count or a routing that leaves other experts empty must reuse
        # the graph: the group sizes are unbacked symbols, not guards.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = runner(x)
        ref = interpret(graph, {"x": x}, weights)
        torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["expert_idx"], ref["expert_idx"])
        empty_expert_seen |= bool((torch.bincount(ref["expert_idx"].reshape(-1), minlength=8) == 0).any())
        if i == 0:
            # Frozen: every expert's and the shared expert's GEMMs got packed weights (3 per FFN, + router).
            assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - packed_before >= 3 * 9
    assert empty_expert_seen  # the calls above include routings with an idle expert
    assert runner.compile_seconds is not None and runner.compile_seconds > 0


def test_compile_settings_trace_the_layer_as_one_graph():
    """fullgraph=True under the runner's settings: a graph break anywhere in the layer raises."""
    from moe_ir.backends.torch_eager import MoELayer

    spec = spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 8, "top_k": 2},
                           "capacity": {"factor": 1.0, "drop": "position"}, "balance": {"switch": 0.01, "z_loss": 0.001}})
    module = MoELayer(build_graph(spec), seed=0).eval()
    x = torch.randn(1, 6, 8)
    with compile_settings(), torch.no_grad():
        explained = torch._dynamo.explain(module)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
