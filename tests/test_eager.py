"""The eager torch backend against the reference interpreter (float64) for every routing option, plus
gradients, dropless routing, capacity dropping by hand, weight I/O errors and graphs after passes."""
from __future__ import annotations

import math

import pytest
import torch

from moe_ir.backends import get_backend
from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.errors import WeightsError
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights, save_weights
from moe_ir.spec import spec_from_dict

H, E, F_, K = 12, 8, 10, 2


def make_spec(**over):
    data = {"hidden": H, "experts": {"routed": E, "width": F_, "top_k": K}}
    for key, value in over.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data.setdefault(section, {})[leaf] = value
        else:
            data[section] = value
    return spec_from_dict(data)


# (id, spec overrides): every routing/FFN option of the spec, one at a time and in DeepSeek combinations.
ROUTING_CASES = [
    ("softmax-greedy", {}),
    ("sigmoid", {"router__score": "sigmoid"}),
    ("group-max", {"router__group_limit": {"groups": 4, "kept": 2, "score": "max"}}),
    ("group-top2sum", {"router__group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"}, "router__score": "sigmoid"}),
    ("normalize-scale", {"router__normalize": True, "router__scaling": 2.5}),
    ("aux-free-bias", {"balance__aux_free": {"gamma": 0.01}, "router__score": "sigmoid"}),
    ("expert-choice", {"router__choice": "expert", "capacity__factor": 1.5}),
    ("capacity-score", {"capacity__factor": 0.75, "capacity__drop": "score"}),
    ("capacity-position", {"capacity__factor": 0.75, "capacity__drop": "position"}),
    ("shared", {"experts": {"routed": E, "width": F_, "top_k": K, "shared": 2, "shared_width": 6}}),
    ("shared-gate", {"experts": {"routed": E, "width": F_, "top_k": K, "shared": 1, "shared_gate": True}}),
    ("geglu", {"experts": {"routed": E, "width": F_, "top_k": K, "activation": "geglu"}}),
    ("gelu", {"experts": {"routed": E, "width": F_, "top_k": K, "activation": "gelu", "shared": 1}}),
    ("relu-bias", {"experts": {"routed": E, "width": F_, "top_k": K, "activation": "relu", "bias": True}}),
    ("swiglu-bias", {"experts": {"routed": E, "width": F_, "top_k": K, "bias": True, "shared": 1}}),
    ("noise-eval", {"router__noise": {"std": 1.0}}),
    ("deepseek-v3", {"router__score": "sigmoid", "router__group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"},
                     "router__normalize": True, "router__scaling": 2.5, "balance__aux_free": {},
                     "balance__sequence": 1e-4,
                     "experts": {"routed": E, "width": F_, "top_k": K, "shared": 1}}),
    ("all-losses", {"balance__switch": 0.01, "balance__expert": 0.01, "balance__device": {"alpha": 0.05, "devices": 2},
                    "balance__sequence": 1e-3, "balance__z_loss": 1e-3}),
]


def random_weights(graph, seed):
    """init_weights, with non-zero biases (init leaves them at 0, which would hide bias bugs)."""
    weights = init_weights(graph, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    for name, t in weights.items():
        if t.dim() < 2 or name.rsplit(".", 1)[-1].startswith("b_"):
            weights[name] = torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3
    return weights


@pytest.mark.parametrize("case", ROUTING_CASES, ids=[c[0] for c in ROUTING_CASES])
def test_module_matches_reference_float64(case):
    spec = make_spec(**case[1])
    graph = build_graph(spec, training=True)
    weights = random_weights(graph, 3)
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float64)
    module = MoELayer(graph, weights).double().eval()
    res = module(x)
    torch.testing.assert_close(res.out, ref["out"], rtol=1e-12, atol=1e-12)
    for key, value in res.routing.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, ref[key], rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(value, ref[key]), key
    assert set(res.losses) == {k[len("loss."):] for k in ref if k.startswith("loss.")}
    for kind, loss in res.losses.items():
        torch.testing.assert_close(loss.double(), ref[f"loss.{kind}"].double(), rtol=1e-6, atol=1e-12)
    if "aux_loss" in ref:
        torch.testing.assert_close(res.aux_loss.double(), ref["aux_loss"].double(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", ROUTING_CASES[:8], ids=[c[0] for c in ROUTING_CASES[:8]])
def test_runner_float32_matches_reference(case):
    spec = make_spec(**case[1])
    graph = build_graph(spec)
    weights = random_weights(graph, 5)
    x = torch.randn(3, 5, H, generator=torch.Generator().manual_seed(2))
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float32)
    got = get_backend("torch").prepare(graph, weights)(x)
    assert set(got) == {k for k in ("out", "expert_idx", "weights", "rows") if k in ref}
    torch.testing.assert_close(got["out"], ref["out"], rtol=1e-5, atol=1e-6)
    for key in set(got) - {"out"}:
        torch.testing.assert_close(got[key], ref[key])


def test_state_dict_keys_are_canonical_names():
    spec = make_spec(experts={"routed": E, "width": F_, "top_k": K, "shared": 2, "shared_gate": True},
                     balance__aux_free={}, router__noise={})
    graph = build_graph(spec, training=True)
    module = MoELayer(graph)
    assert set(module.state_dict()) == set(graph.weights)
    assert "router.bias" in dict(module.named_buffers())
    assert "router.bias" not in dict(module.named_parameters())
    assert {"router.weight", "experts.w_up", "shared.0.w_gate", "shared_gate.weight"} <= set(module.state_dict())
    # Seeded init: the same seed gives the same weights, params.init_weights defines them.
    ref = init_weights(graph, 4)
    again = MoELayer(graph, seed=4).state_dict()
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_gradcheck_float64_tiny_layer():
    spec = make_spec(experts={"routed": 4, "width": 3, "top_k": 2, "shared": 1, "bias": True},
                     hidden=5, balance__expert=0.1, balance__z_loss=0.01)
    module = MoELayer(build_graph(spec, training=True), seed=2).double()
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())
    x = torch.randn(1, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def f(x, *ps):
        res = torch.func.functional_call(module, dict(zip(names, ps)), (x,))
        return res.out, res.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)
    out, aux = f(x, *params)
    grads = torch.autograd.grad((out ** 2).sum() + aux, params)
    by_name = dict(zip(names, grads))
    for name in ("router.weight", "experts.w_up", "experts.w_down", "experts.w_gate", "shared.0.w_up"):
        assert by_name[name].abs().sum() > 0, name


def _expert_ffn(module, e, x):
    ex = module.experts
    h = torch.nn.functional.silu(x @ ex.w_gate[e].T) * (x @ ex.w_up[e].T)
    return h @ ex.w_down[e].T


def test_dropless_loses_no_token():
    spec = make_spec()
    module = MoELayer.from_spec(spec, seed=1).double()
    x = torch.randn(2, 9, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    res = module(x)
    tokens = x.reshape(-1, H)
    idx, w = res.routing["expert_idx"], res.routing["weights"]
    expected = torch.stack([sum(w[t, j] * _expert_ffn(module, int(idx[t, j]), tokens[t]) for j in range(K))
                            for t in range(tokens.shape[0])])
    torch.testing.assert_close(res.out.reshape(-1, H), expected, rtol=1e-12, atol=1e-12)
    assert int(res.routing["tokens_per_expert"].sum()) == tokens.shape[0] * K


@pytest.mark.parametrize("rule", ["score", "position"])
def test_capacity_drops_exactly_the_rule(rule):
    factor = 0.5
    spec = make_spec(capacity__factor=factor, capacity__drop=rule)
    module = MoELayer.from_spec(spec, seed=6).double()
    # Skew the router so some experts overflow.
    with torch.no_grad():
        module.router.weight[0] += 0.8
    x = torch.randn(1, 12, H, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).abs()
    res = module(x)
    tokens = x.reshape(-1, H)
    t_count = tokens.shape[0]
    idx, w = res.routing["expert_idx"].tolist(), res.routing["weights"]
    capacity = math.ceil(factor * t_count * K / E)
    # By hand: the list of (token, slot) assignments each expert keeps.
    if rule == "position":
        order = [(t, j) for j in range(K) for t in range(t_count)]  # every first choice before any second
    else:
        order = sorted(((t, j) for t in range(t_count) for j in range(K)), key=lambda a: (-float(w[a].detach()), a[0] * K + a[1]))
    taken = [0] * E
    kept = set()
    for t, j in order:
        e = idx[t][j]
        if taken[e] < capacity:
            taken[e] += 1
            kept.add((t, j))
    assert len(kept) < t_count * K, "the case must drop something"
    assert res.routing["tokens_per_expert"].tolist() == taken
    expected = torch.stack([
        sum((w[t, j] * _expert_ffn(module, idx[t][j], tokens[t]) for j in range(K) if (t, j) in kept),
            torch.zeros(H, dtype=torch.float64))
        for t in range(t_count)])
    torch.testing.assert_close(res.out.reshape(-1, H), expected, rtol=1e-12, atol=1e-12)


def test_graphs_after_passes_match_reference():
    from moe_ir.passes import PIPELINES, run_pipeline

    spec = make_spec(experts={"routed": E, "width": F_, "top_k": K, "shared": 2, "bias": True},
                     router__group_limit={"groups": 4, "kept": 2}, capacity__factor=1.0)
    base = build_graph(spec)
    weights = random_weights(base, 8)
    x = torch.randn(2, 6, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ref = interpret(base, {"x": x}, weights, dtype=torch.float64)
    for pipeline in ("optimize", "fused"):
        graph = run_pipeline(build_graph(spec), PIPELINES[pipeline])
        got = get_backend("torch").prepare(graph, {k: v.double() for k, v in weights.items()})(x)
        torch.testing.assert_close(got["out"], ref["out"], rtol=1e-10, atol=1e-12, msg=pipeline)
        assert torch.equal(got["expert_idx"], ref["expert_idx"])
    # Training through the fused gate/up layout: gradients reach the canonical (separate) parameters.
    module = MoELayer(run_pipeline(build_graph(spec), PIPELINES["optimize"]), weights)
    module(x.float()).out.sum().backward()
    assert module.experts.w_gate.grad.abs().sum() > 0 and module.shared.get_submodule("1").w_up.grad is not None


def test_load_errors_list_every_bad_name(tmp_path):
    spec = make_spec(experts={"routed": E, "width": F_, "top_k": K, "shared": 1})
    graph = build_graph(spec)
    module = MoELayer(graph)
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    weights["experts.w_up"] = torch.zeros(E, F_ + 1, H)
    del weights["shared.0.w_gate"]
    weights["experts.w_extra"] = torch.zeros(3)
    path = save_weights(weights, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        module.load_safetensors(path)
    text = str(err.value)
    assert "shared.0.w_gate" in text and "experts.w_extra" in text
    assert f"experts.w_up: expected [{E}, {F_}, {H}], found [{E}, {F_ + 1}, {H}]" in text
    with pytest.raises(WeightsError):
        MoELayer(graph, weights)
    # A good file round-trips exactly.
    good = MoELayer(graph, seed=9)
    good.save_safetensors(tmp_path / "good.safetensors")
    module.load_safetensors(tmp_path / "good.safetensors")
    assert all(torch.equal(module.state_dict()[k], v) for k, v in good.state_dict().items())


def test_no_tokens_by_experts_by_hidden_tensor():
    """No op in a forward+backward produces a tensor with T x E x H elements (or more)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestOutput(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    LargestOutput.largest = max(LargestOutput.largest, t.numel())
            return result

    spec = make_spec(hidden=64, experts={"routed": 32, "width": 16, "top_k": 2}, balance__expert=0.01)
    module = MoELayer.from_spec(spec)
    x = torch.randn(4, 64, 64)
    t = x.shape[0] * x.shape[1]
    with LargestOutput():
        res = module(x)
        (res.out.sum() + res.aux_loss).backward()
    weights = max(p.numel() for p in module.parameters())
    assert LargestOutput.largest <= max(t * 2 * 64, weights)  # the gathered rows [T*k, H] at most
    assert LargestOutput.largest < t * 32 * 64
