"""The `compile` backend (torch.compile of the eager module, inductor, dynamic token count) against the
reference interpreter on two token counts: one compilation (~15 s on 2 cores) serves both."""
from __future__ import annotations

import torch

from moe_ir.backends import get_backend
from moe_ir.builder import build_graph
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights
from moe_ir.spec import spec_from_dict


def test_compiled_runner_matches_reference_on_dynamic_token_counts():
    spec = spec_from_dict({"hidden": 16, "experts": {"routed": 8, "width": 8, "top_k": 2, "shared": 1},
                           "router": {"score": "sigmoid", "normalize": True}, "balance": {"aux_free": {}}})
    graph = build_graph(spec)
    weights = init_weights(graph, 0)
    weights["router.bias"] = torch.linspace(-0.1, 0.1, 8)
    backend = get_backend("compile")
    assert backend.supports(graph) == (True, "")
    runner = backend.prepare(graph, weights)
    for tokens in (5, 11):
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(tokens))
        got = runner(x)
        ref = interpret(graph, {"x": x}, weights)
        torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-6)
        assert torch.equal(got["expert_idx"], ref["expert_idx"])
    assert runner.compile_seconds is not None and runner.compile_seconds > 0
