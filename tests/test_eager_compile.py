"""The `compile` backend (torch.compile of the eager module, inductor, one graph, dynamic token count,
frozen weights, the expert FFN as one custom op) against the reference interpreter: one compilation
(~10 s on 2 cores) serves several token counts and routings, with no recompilation; and a user's own
torch.compile of the eager module traces it as one graph."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from moe_ir.backends import get_backend
from moe_ir.backends.compile import expert_ffns
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
            # Frozen: the shared expert's three GEMMs and the router's got packed weights.
            assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] - packed_before >= 4
    assert empty_expert_seen  # the calls above include routings with an idle expert
    assert runner.compile_seconds is not None and runner.compile_seconds > 0


def test_users_own_compile_of_the_eager_layer_is_one_graph():
    """torch.compile of the eager (trainable) module as it is, with capture_scalar_outputs: no graph break
    (kernels.grouped_ffn_traced), capacity dispatch and losses included."""
    from moe_ir.backends.torch_eager import MoELayer

    spec = spec_from_dict({"hidden": 8, "experts": {"routed": 4, "width": 8, "top_k": 2},
                           "capacity": {"factor": 1.0, "drop": "position"}, "balance": {"switch": 0.01, "z_loss": 0.001}})
    module = MoELayer(build_graph(spec), seed=0).eval()
    x = torch.randn(1, 6, 8)
    with torch._dynamo.config.patch(capture_scalar_outputs=True), torch.no_grad():
        explained = torch._dynamo.explain(module)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gated, biases", [(True, False), (False, True)])
def test_expert_ffns_op_equals_the_eager_grouped_ffn(dtype, gated, biases):
    """The custom op (oneDNN GEMMs for float32, F.linear for float64) against kernels.grouped_ffn, with idle
    experts and dropped rows (rows past every group stay 0); opcheck checks its registration and fake."""
    from moe_ir.backends import torch_kernels as K

    gen = torch.Generator().manual_seed(0)
    e, h, f, tokens, k = 6, 16, 8, 7, 2
    x = torch.randn(tokens, h, generator=gen, dtype=dtype)
    w = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype) * 0.3  # noqa: E731
    w_up, w_down, w_gate = w(e, f, h), w(e, h, f), w(e, f, h) if gated else None
    b_up, b_down, b_gate = (w(e, f), w(e, h), None) if biases else (None, None, None)
    group_sizes = torch.tensor([3, 0, 4, 1, 0, 3])  # 11 kept of 14 assignments: 3 dropped
    rows = torch.randint(0, tokens, (tokens * k,), generator=gen)
    act = "swiglu" if gated else "gelu"
    got = expert_ffns(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, act)
    want = K.grouped_ffn(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, act)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    assert got[11:].abs().max() == 0
    torch.library.opcheck(torch.ops.moe_ir.expert_ffns.default,
                          (x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, act),
                          test_utils=("test_schema", "test_faketensor"))
