"""Triton MoE kernels (backends/triton) against their torch references.

Layers: each kernel vs its ``*_reference`` on odd shapes and all three activation dtypes;
the chained layer vs ``moe_forward_reference``, which does not use the dispatch layout; the
custom ops' gradients vs autograd through the reference; ``torch.compile(fullgraph=True,
dynamic=True)``; ``torch.library.opcheck`` on every op. On a CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set below and in conftest before triton is imported).
"""
import importlib.util
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")


def _load_backend():
    try:
        from moe_ir.backends import triton as backend  # installed layout
        return backend
    except ImportError:
        # Source checkout without an install: load backends/triton as a package of its own.
        root = Path(__file__).resolve().parents[1] / "backends" / "triton"
        spec = importlib.util.spec_from_file_location(
            "moe_ir_backends_triton", root / "__init__.py", submodule_search_locations=[str(root)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


mt = _load_backend()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) per activation dtype, relative to outputs of magnitude ~1. fp32 kernels do the
# same fp32 math in another order; fp16/bf16 round x, weights and the intermediate h.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}
ROUTE_WEIGHT_TOL = (1e-6, 1e-5)  # routing always runs in fp32

# (name, T, E, k, n_group, topk_group, score, group_score, normalize, scale, bias)
ROUTE_CASES = [
    ("deepseek-v3", 257, 256, 8, 8, 4, "sigmoid", "top2_sum", True, 2.5, True),
    ("deepseek-v2-group-max", 33, 64, 6, 8, 3, "softmax", "max", False, 16.0, False),
    ("greedy-k1", 3, 8, 1, 1, 1, "softmax", "max", False, 1.0, False),
    ("greedy-k2-norm", 1, 8, 2, 1, 1, "softmax", "max", True, 1.0, False),
    ("greedy-k6", 257, 64, 6, 1, 1, "softmax", "max", False, 1.0, False),
    ("odd-groups-160", 5, 160, 6, 8, 3, "softmax", "max", False, 16.0, True),
]
ACTIVATIONS = ["swiglu", "geglu", "gelu", "relu"]


def _make_layer(num_tokens, hidden, ffn, num_experts, dtype, activation, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, fan_in=1):
        return (torch.randn(*shape, generator=gen) / fan_in**0.5).to(dtype).to(DEVICE)

    x = rand(num_tokens, hidden)
    w_gate = rand(num_experts, ffn, hidden, fan_in=hidden) if activation in ("swiglu", "geglu") else None
    w_up = rand(num_experts, ffn, hidden, fan_in=hidden)
    w_down = rand(num_experts, hidden, ffn, fan_in=ffn)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(DEVICE)
    return x, logits, w_gate, w_up, w_down


def _assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------- public API
def test_public_api():
    assert sorted(mt.__all__) == sorted([
        "combine", "combine_reference", "dispatch", "dispatch_reference", "expert_ffn",
        "expert_ffn_reference", "moe_forward", "moe_forward_reference", "padded_size", "route",
        "route_reference",
    ])
    for name in ("route", "dispatch", "expert_ffn", "combine"):
        assert hasattr(torch.ops.moe_ir, name)


def test_kernels_are_exercised():
    # Without a GPU and without TRITON_INTERPRET=1 the ops fall back to torch, and every test
    # below would compare torch with torch.
    assert mt.ops._use_triton(torch.empty(1, device=DEVICE)), (
        "Triton kernels are not running: set TRITON_INTERPRET=1 before triton is imported")


# ------------------------------------------------------------------------------------------ route
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[c[0] for c in ROUTE_CASES])
def test_route_matches_reference(case):
    _, num_tokens, num_experts, k, n_group, topk_group, score, group_score, normalize, scale, has_bias = case
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(num_tokens, num_experts, generator=gen).to(DEVICE)
    bias = (0.1 * torch.randn(num_experts, generator=gen)).to(DEVICE) if has_bias else None
    options = dict(score=score, k=k, n_group=n_group, topk_group=topk_group, group_score=group_score,
                   normalize=normalize, scale=scale)
    weights, expert_idx = mt.route(logits, bias, **options)
    ref_weights, ref_idx = mt.route_reference(logits, bias, **options)
    assert weights.shape == (num_tokens, k) and weights.dtype == torch.float32
    assert expert_idx.shape == (num_tokens, k) and expert_idx.dtype == torch.int64
    torch.testing.assert_close(expert_idx, ref_idx, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=ROUTE_WEIGHT_TOL[0], rtol=ROUTE_WEIGHT_TOL[1])
    if n_group > 1:  # every chosen expert lies in one of the topk_group kept groups
        groups = expert_idx // (num_experts // n_group)
        assert all(len(set(row.tolist())) <= topk_group for row in groups)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_route_reads_any_float_logits(dtype):
    # Distinct logits per row on a 1/8 grid, exact in every dtype: low-precision random draws would tie,
    # and a tie may legitimately be broken differently by the kernel and torch.topk.
    gen = torch.Generator().manual_seed(4)
    logits = torch.stack([torch.randperm(64, generator=gen) for _ in range(17)]).float().div(8).sub(4)
    logits = logits.to(dtype).to(DEVICE)
    weights, expert_idx = mt.route(logits, score="sigmoid", k=4, n_group=4, topk_group=2,
                                   group_score="top2_sum", normalize=True)
    ref_weights, ref_idx = mt.route_reference(logits, None, score="sigmoid", k=4, n_group=4, topk_group=2,
                                              group_score="top2_sum", normalize=True)
    torch.testing.assert_close(expert_idx, ref_idx, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=ROUTE_WEIGHT_TOL[0], rtol=ROUTE_WEIGHT_TOL[1])


def test_route_rejects_bad_options():
    logits = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"n_group=5 must divide E=12"):
        mt.route(logits, k=2, n_group=5, topk_group=1)
    with pytest.raises(ValueError, match=r"k=7 must be in 1..6"):
        mt.route(logits, k=7, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=r"bias must be float \[E=12\], got \(11,\)"):
        mt.route(logits, torch.zeros(11), k=2)


# --------------------------------------------------------------------------------------- dispatch
def _check_dispatch_invariants(expert_idx, num_experts, block, outputs):
    sorted_assignment, assignment_row, offsets, padded_offsets, block_expert = (o.long().cpu() for o in outputs)
    flat = expert_idx.reshape(-1).cpu()
    live = (flat >= 0) & (flat < num_experts)
    assert sorted_assignment.numel() == mt.padded_size(flat.numel(), num_experts, block)
    counts = torch.bincount(flat[live], minlength=num_experts)
    assert offsets.tolist() == [0] + counts.cumsum(0).tolist()
    assert (padded_offsets.diff() % block == 0).all()
    for e in range(num_experts):
        rows = sorted_assignment[padded_offsets[e]:padded_offsets[e + 1]]
        members = rows[rows >= 0]
        assert members.tolist() == torch.nonzero(live & (flat == e)).flatten().tolist()  # stable
        assert (rows[: len(members)] >= 0).all()  # padding only at the end of the group
    assert (assignment_row[~live] == -1).all()
    assert (sorted_assignment[assignment_row[live]] == torch.nonzero(live).flatten()).all()
    assert (sorted_assignment[padded_offsets[-1]:] == -1).all()
    expected_blocks = torch.repeat_interleave(torch.arange(num_experts), (padded_offsets.diff() // block))
    assert block_expert[: len(expected_blocks)].tolist() == expected_blocks.tolist()
    assert (block_expert[len(expected_blocks):] == -1).all()


@pytest.mark.parametrize(
    "num_tokens,num_experts,k,block",
    [(1, 8, 2, 16), (3, 64, 6, 16), (257, 256, 8, 16), (40, 8, 2, 32), (0, 8, 2, 16)],
)
def test_dispatch_matches_reference(num_tokens, num_experts, k, block):
    gen = torch.Generator().manual_seed(2)
    # argsort of random scores gives k distinct experts per token, as routing does
    expert_idx = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :k].to(DEVICE)
    outputs = mt.dispatch(expert_idx, num_experts, block)
    for got, ref in zip(outputs, mt.dispatch_reference(expert_idx, num_experts, block)):
        assert got.dtype == torch.int32
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    _check_dispatch_invariants(expert_idx, num_experts, block, outputs)


def test_dispatch_empty_experts_and_dropped_sentinel():
    num_experts, block = 8, 16
    # experts 0, 3 and 7 get no tokens; value 8 (= E) marks dropped assignments
    expert_idx = torch.tensor([[1, 8], [2, 4], [8, 8], [4, 1], [6, 5], [2, 8], [5, 6]]).to(DEVICE)
    outputs = mt.dispatch(expert_idx, num_experts, block)
    for got, ref in zip(outputs, mt.dispatch_reference(expert_idx, num_experts, block)):
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    _check_dispatch_invariants(expert_idx, num_experts, block, outputs)
    counts = outputs[2].diff()
    assert counts[[0, 3, 7]].tolist() == [0, 0, 0]
    assert int(counts.sum()) == 10  # 14 assignments, 4 dropped


# ------------------------------------------------------------------------------------- expert FFN
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_expert_ffn_matches_reference(dtype, activation):
    num_tokens, hidden, ffn, num_experts, k, block = 37, 48, 40, 8, 2, 16
    x, logits, w_gate, w_up, w_down = _make_layer(num_tokens, hidden, ffn, num_experts, dtype, activation)
    _, expert_idx = mt.route(logits, k=k)
    expert_idx[:, 1] = torch.where(expert_idx[:, 1] == 3, num_experts, expert_idx[:, 1])  # drop some
    sorted_assignment, _, _, _, block_expert = mt.dispatch(expert_idx, num_experts, block)
    args = (x, sorted_assignment, block_expert, w_gate, w_up, w_down)
    y = mt.expert_ffn(*args, k=k, block=block, activation=activation)
    ref = mt.expert_ffn_reference(*args, k=k, block=block, activation=activation)
    assert y.shape == (sorted_assignment.numel(), hidden) and y.dtype == dtype
    _assert_close(y, ref, dtype)
    assert (y[sorted_assignment < 0] == 0).all()


def test_expert_ffn_rejects_bad_shapes():
    x = torch.randn(4, 8)
    w_up = torch.randn(2, 6, 8)
    w_down = torch.randn(2, 8, 6)
    sa = torch.full((32,), -1, dtype=torch.int32)
    be = torch.full((2,), -1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"w_down must be \[E, H, F\] = \(2, 8, 6\), got \(2, 6, 8\)"):
        mt.expert_ffn(x, sa, be, None, w_up, w_up, k=1, block=16, activation="relu")
    with pytest.raises(ValueError, match=r"swiglu needs w_gate of shape \(2, 6, 8\), got None"):
        mt.expert_ffn(x, sa, be, None, w_up, w_down, k=1, block=16, activation="swiglu")
    with pytest.raises(ValueError, match=r"w_up dtype torch.float16 differs"):
        mt.expert_ffn(x, sa, be, None, w_up.half(), w_down, k=1, block=16, activation="relu")


# ---------------------------------------------------------------------------------------- combine
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens", [1, 3, 257])
def test_combine_matches_reference(dtype, num_tokens):
    num_experts, k, block, hidden = 8, 2, 16, 40
    gen = torch.Generator().manual_seed(3)
    expert_idx = torch.rand(num_tokens, num_experts, generator=gen).argsort(dim=1)[:, :k]
    expert_idx[0, 0] = num_experts  # one dropped slot
    expert_idx = expert_idx.to(DEVICE)
    _, assignment_row, _, _, _ = mt.dispatch(expert_idx, num_experts, block)
    a_pad = mt.padded_size(num_tokens * k, num_experts, block)
    y = torch.randn(a_pad, hidden, generator=gen).to(dtype).to(DEVICE)
    weights = torch.rand(num_tokens, k, generator=gen).to(DEVICE)
    out = mt.combine(y, assignment_row, weights)
    assert out.shape == (num_tokens, hidden) and out.dtype == dtype
    _assert_close(out, mt.combine_reference(y, assignment_row, weights), dtype)


# ------------------------------------------------------------------------------------ whole layer
LAYER_CASES = [
    # (name, T, E, k, n_group, topk_group, score, group_score, normalize, scale, bias, activation)
    ("deepseek-v3", 33, 256, 8, 8, 4, "sigmoid", "top2_sum", True, 2.5, True, "swiglu"),
    ("group-max", 3, 64, 6, 8, 3, "softmax", "max", False, 16.0, False, "geglu"),
    ("greedy-k1", 1, 8, 1, 1, 1, "softmax", "max", False, 1.0, False, "relu"),
    ("greedy-k2", 257, 8, 2, 1, 1, "softmax", "max", True, 1.0, False, "swiglu"),
    ("greedy-k6", 19, 64, 6, 1, 1, "softmax", "max", False, 1.0, False, "gelu"),
]


@pytest.mark.parametrize("case", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_moe_forward_matches_definition(case):
    _, num_tokens, num_experts, k, n_group, topk_group, score, group_score, normalize, scale, has_bias, act = case
    x, logits, w_gate, w_up, w_down = _make_layer(num_tokens, 32, 24, num_experts, torch.float32, act)
    bias = (0.1 * torch.randn(num_experts)).to(DEVICE) if has_bias else None
    options = dict(activation=act, score=score, k=k, n_group=n_group, topk_group=topk_group,
                   group_score=group_score, normalize=normalize, scale=scale)
    out, weights, expert_idx = mt.moe_forward(x, logits, bias, w_gate, w_up, w_down, **options)
    ref, ref_weights, ref_idx = mt.moe_forward_reference(x, logits, bias, w_gate, w_up, w_down, **options)
    torch.testing.assert_close(expert_idx, ref_idx, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=ROUTE_WEIGHT_TOL[0], rtol=ROUTE_WEIGHT_TOL[1])
    _assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_moe_forward_low_precision(dtype):
    x, logits, w_gate, w_up, w_down = _make_layer(21, 32, 24, 8, dtype, "swiglu")
    out, _, _ = mt.moe_forward(x, logits, None, w_gate, w_up, w_down, k=2, normalize=True)
    ref, _, _ = mt.moe_forward_reference(x, logits, None, w_gate, w_up, w_down, activation="swiglu",
                                         score="softmax", k=2, normalize=True)
    assert out.dtype == dtype
    _assert_close(out, ref, dtype)


def test_dropped_assignments_contribute_nothing():
    num_tokens, num_experts, k, block = 9, 8, 2, 16
    x, logits, w_gate, w_up, w_down = _make_layer(num_tokens, 32, 24, num_experts, torch.float32, "swiglu")
    weights, expert_idx = mt.route(logits, k=k)
    expert_idx[::2, 1] = num_experts  # capacity dropping: second choice of every other token
    sorted_assignment, assignment_row, _, _, block_expert = mt.dispatch(expert_idx, num_experts, block)
    y = mt.expert_ffn(x, sorted_assignment, block_expert, w_gate, w_up, w_down, k=k, block=block,
                      activation="swiglu")
    out = mt.combine(y, assignment_row, weights)
    expected = torch.zeros_like(out)
    for t in range(num_tokens):
        for slot in range(k):
            e = int(expert_idx[t, slot])
            if e < num_experts:
                row = mt.reference.expert_mlp(x[t:t + 1], w_gate[e], w_up[e], w_down[e], "swiglu")
                expected[t] += weights[t, slot] * row[0]
    _assert_close(out, expected, torch.float32)


# -------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("activation,score,n_group,normalize", [
    ("swiglu", "sigmoid", 4, True),
    ("gelu", "softmax", 1, False),
])
def test_custom_op_gradients_match_reference_autograd(activation, score, n_group, normalize):
    num_tokens, hidden, ffn, num_experts, k = 11, 16, 12, 8, 3
    x, _, w_gate, w_up, w_down = _make_layer(num_tokens, hidden, ffn, num_experts, torch.float32, activation)
    router = torch.randn(num_experts, hidden, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    bias = (0.1 * torch.randn(num_experts)).to(DEVICE) if score == "sigmoid" else None
    options = dict(activation=activation, score=score, k=k, n_group=n_group, topk_group=2,
                   group_score="top2_sum" if score == "sigmoid" else "max", normalize=normalize, scale=1.7)
    params = [p for p in (x, router, w_gate, w_up, w_down) if p is not None]

    def grads(forward):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        lx, lr, *ws = leaves
        wg, wu, wd = ws if len(ws) == 3 else (None, *ws)
        out, weights, _ = forward(lx, lx @ lr.T, bias, wg, wu, wd, **options)
        upstream = torch.linspace(-1, 1, out.numel(), device=DEVICE).reshape(out.shape)
        (out * upstream).sum().add((weights * weights).sum()).backward()
        return [leaf.grad for leaf in leaves]

    for got, ref in zip(grads(mt.moe_forward), grads(mt.moe_forward_reference)):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- torch.compile
def test_compiled_layer_fullgraph_dynamic_trains():
    hidden, ffn, num_experts, k = 16, 12, 8, 2
    _, _, w_gate, w_up, w_down = _make_layer(1, hidden, ffn, num_experts, torch.float32, "swiglu")
    router = torch.randn(num_experts, hidden).to(DEVICE)
    options = dict(activation="swiglu", score="sigmoid", k=k, n_group=2, topk_group=1, group_score="top2_sum",
                   normalize=True, scale=2.5)

    def layer(x, wg, wu, wd):
        return mt.moe_forward(x, x @ router.T, None, wg, wu, wd, **options)[0]

    def reference(x, wg, wu, wd):
        return mt.moe_forward_reference(x, x @ router.T, None, wg, wu, wd, **options)[0]

    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for num_tokens in (5, 23):
        x = torch.randn(num_tokens, hidden).to(DEVICE)
        results = []
        for fn in (compiled, reference):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
            out = fn(*leaves)
            out.square().sum().backward()
            results.append([out.detach()] + [leaf.grad for leaf in leaves])
        for got, ref in zip(*results):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------- opcheck
def _opcheck_inputs():
    num_tokens, hidden, ffn, num_experts, k, block = 5, 16, 16, 4, 2, 16
    x, logits, w_gate, w_up, w_down = _make_layer(num_tokens, hidden, ffn, num_experts, torch.float32, "swiglu")
    weights, expert_idx = mt.route(logits, k=k, normalize=True)
    sorted_assignment, assignment_row, _, _, block_expert = mt.dispatch(expert_idx, num_experts, block)
    y = mt.expert_ffn(x, sorted_assignment, block_expert, w_gate, w_up, w_down, k=k, block=block,
                      activation="swiglu")
    return {
        "route": (logits.requires_grad_(), torch.zeros(num_experts, device=DEVICE), "sigmoid", k, 2, 1,
                  "top2_sum", True, 2.5),
        "dispatch": (expert_idx, num_experts, block),
        "expert_ffn": (x.requires_grad_(), sorted_assignment, block_expert, w_gate.requires_grad_(),
                       w_up.requires_grad_(), w_down.requires_grad_(), k, block, "swiglu"),
        "combine": (y.detach().requires_grad_(), assignment_row, weights.detach().requires_grad_()),
    }


@pytest.mark.parametrize("name", ["route", "dispatch", "expert_ffn", "combine"])
def test_opcheck(name):
    args = _opcheck_inputs()[name]
    torch.library.opcheck(getattr(torch.ops.moe_ir, name).default, args)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
@pytest.mark.parametrize("dtype", list(TOLERANCES))
def test_gpu_deepseek_v3_shape(dtype):
    x, logits, w_gate, w_up, w_down = _make_layer(1000, 256, 128, 256, dtype, "swiglu")
    bias = 0.1 * torch.randn(256, device=DEVICE)
    options = dict(activation="swiglu", score="sigmoid", k=8, n_group=8, topk_group=4, group_score="top2_sum",
                   normalize=True, scale=2.5)
    out, weights, expert_idx = mt.moe_forward(x, logits, bias, w_gate, w_up, w_down, **options)
    ref, _, ref_idx = mt.moe_forward_reference(x, logits, bias, w_gate, w_up, w_down, **options)
    torch.testing.assert_close(expert_idx, ref_idx, atol=0, rtol=0)
    _assert_close(out, ref, dtype)
