"""The `triton` backend (backends/triton/backend.py) against the reference interpreter.

Tiny specs, a few tokens: on a CPU every Triton kernel runs in the interpreter (TRITON_INTERPRET=1,
set in conftest before triton is imported), and a test below counts interpreted launches so the
comparisons cannot silently be torch against torch. Covered: values of each routing/shared/activation
variant in float32; the reasons supports() gives; torch.compile(fullgraph=True, dynamic=True) of the
lowered module with two token counts; gradients against autograd through the reference semantics.
"""
import os
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from moe_ir.backends import get_backend  # noqa: E402
from moe_ir.builder import ROUTER_BIAS, build_graph  # noqa: E402
from moe_ir.errors import BackendError  # noqa: E402
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.ir import op_def  # noqa: E402
from moe_ir.params import init_weights  # noqa: E402
from moe_ir.passes import run_pipeline  # noqa: E402
from moe_ir.spec import spec_from_dict  # noqa: E402

from moe_ir.backends.triton.backend import TritonMoELayer  # noqa: E402

ON_GPU = torch.cuda.is_available()
# float32 against the float64 reference: the kernels accumulate in fp32 in another order.
ATOL, RTOL = 2e-5, 2e-5


def _spec(**changes):
    data = {"name": "tiny-triton", "hidden": 32,
            "experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 0, "activation": "swiglu"},
            "router": {"score": "softmax"}}
    for path, value in changes.items():
        section, _, key = path.rpartition("__")
        target = data[section] if section else data
        target[key] = value
    return spec_from_dict(data)


V3_ROUTER = {"score": "sigmoid", "group_limit": {"groups": 4, "kept": 2, "score": "top2_sum"},
             "normalize": True, "scaling": 2.5}
SPECS = {
    "softmax-greedy": _spec(),
    "sigmoid-bias-group-top2sum": _spec(experts__routed=16, experts__top_k=4, router=V3_ROUTER,
                                        balance={"aux_free": {"gamma": 0.001}}),
    "shared-2-fused": _spec(experts__shared=2),
    "qwen-shared-gate": _spec(experts__shared=1, experts__shared_width=24, experts__shared_gate=True,
                              router={"score": "softmax", "normalize": True}),
    "geglu": _spec(experts__activation="geglu"),
    "gelu": _spec(experts__activation="gelu", experts__top_k=1),
    "relu": _spec(experts__activation="relu", experts__top_k=3),
}


def _weights(spec, seed=0):
    graph = build_graph(spec)
    weights = init_weights(graph, seed)
    if ROUTER_BIAS in weights:
        # A zero bias (the initial value) would leave the bias path untested.
        weights[ROUTER_BIAS] = torch.randn(weights[ROUTER_BIAS].shape, generator=torch.Generator().manual_seed(seed)) * 0.1
    return weights


def _lowered(spec, backend):
    return run_pipeline(build_graph(spec), backend.pipeline)


class _LaunchCounter:
    """Counts interpreted Triton launches (only meaningful on a CPU)."""

    def __init__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.count = 0
        original = InterpretedFunction.run

        def counted(fn_self, *args, **kwargs):
            self.count += 1
            return original(fn_self, *args, **kwargs)

        self._patch = mock.patch.object(InterpretedFunction, "run", counted)

    def __enter__(self):
        self._patch.__enter__()
        return self

    def __exit__(self, *exc):
        return self._patch.__exit__(*exc)


# --------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference_interpreter(name):
    spec = SPECS[name]
    backend = get_backend("triton")
    graph = _lowered(spec, backend)
    assert backend.supports(graph) == (True, "")
    weights = _weights(spec)
    runner = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})
    x = torch.randn(2, 3, spec.hidden, generator=torch.Generator().manual_seed(1))
    with _LaunchCounter() as launches:
        got = runner(x)
    ref = interpret(build_graph(spec), {"x": x}, weights, dtype=torch.float64)

    if ON_GPU:
        assert runner.path == "triton-cuda"
    else:
        assert runner.path == "triton-interpreter"
        assert launches.count >= 5, "the routed path did not run the interpreted Triton kernels"
        assert any("interpreter" in note for note in runner.notes)
    assert set(got) == {"out", "expert_idx", "weights"}
    assert got["out"].shape == x.shape and got["out"].dtype == torch.float32
    torch.testing.assert_close(got["expert_idx"].sort(dim=-1).values, ref["expert_idx"].sort(dim=-1).values)
    order_got, order_ref = got["expert_idx"].argsort(dim=-1), ref["expert_idx"].argsort(dim=-1)
    torch.testing.assert_close(got["weights"].double().gather(-1, order_got), ref["weights"].gather(-1, order_ref),
                               atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got["out"].double(), ref["out"], atol=ATOL, rtol=RTOL)


def test_single_token_and_unfolded_weights_agree():
    spec = SPECS["shared-2-fused"]
    backend = get_backend("triton")
    graph = _lowered(spec, backend)
    weights = {k: v for k, v in _weights(spec).items() if k in graph.weights}
    x = torch.randn(1, 1, spec.hidden, generator=torch.Generator().manual_seed(2))
    folded = backend.prepare(graph, weights)(x)
    unfolded = backend.prepare(graph, weights, fold_weights=False)(x)
    ref = interpret(build_graph(spec), {"x": x}, _weights(spec), dtype=torch.float64)
    torch.testing.assert_close(folded["out"].double(), ref["out"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(unfolded["out"], folded["out"], atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------- supports
@pytest.mark.parametrize("changes, expected", [
    ({"router": {"score": "softmax", "choice": "expert"}}, "expert-choice routing"),
    ({"capacity": {"factor": 1.25, "drop": "position"}}, "capacity factor 1.25"),
    ({"router": {"score": "softmax", "noise": {"std": 1.0}}}, "noisy router"),
    ({"experts__bias": True}, "expert biases (b_up, b_down, b_gate)"),
    ({"dtype": "float64"}, "f64 activations"),
])
def test_supports_says_why_not(changes, expected):
    spec = _spec(**changes)
    backend = get_backend("triton")
    graph = _lowered(spec, backend)
    ok, reason = backend.supports(graph)
    assert not ok and expected in reason, reason
    with pytest.raises(BackendError, match="cannot lower"):
        backend.prepare(graph, {k: v for k, v in init_weights(graph, 0).items()})


def test_training_graph_is_refused_with_reason():
    backend = get_backend("triton")
    spec = _spec(balance={"expert": 0.01})
    graph = build_graph(spec, training=True)  # not through the pipeline: losses still read the scores
    ok, reason = backend.supports(graph)
    assert not ok and "training graph" in reason
    # Through the backend's own pipeline the training outputs are stripped and the layer fuses.
    assert backend.supports(run_pipeline(build_graph(spec, training=True), backend.pipeline)) == (True, "")


def test_unknown_option_is_rejected():
    backend = get_backend("triton")
    spec = SPECS["softmax-greedy"]
    graph = _lowered(spec, backend)
    with pytest.raises(BackendError, match="takes options"):
        backend.prepare(graph, init_weights(graph, 0), tile=64)


# -------------------------------------------------------------------------------------- torch.compile
def test_compiled_module_fullgraph_dynamic_two_token_counts():
    spec = SPECS["sigmoid-bias-group-top2sum"]
    backend = get_backend("triton")
    graph = _lowered(spec, backend)
    weights = _weights(spec)
    eager = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})
    # compile=True is torch.compile(module, fullgraph=True, dynamic=True): a graph break raises.
    compiled = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights}, compile=True)
    for seq in (3, 7):
        x = torch.randn(1, seq, spec.hidden, generator=torch.Generator().manual_seed(seq))
        if seq == 3:
            got = compiled(x)
        else:
            # dynamic=True: a new token count reuses the graph compiled for the first one.
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(x)
        want = eager(x)
        torch.testing.assert_close(got["expert_idx"], want["expert_idx"])
        torch.testing.assert_close(got["out"], want["out"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["weights"], want["weights"], atol=1e-6, rtol=1e-5)
    assert compiled.compile_seconds is not None
    if not ON_GPU:
        assert compiled.path == "torch-traced"
        assert any("torch.compile traces" in note for note in compiled.notes)


# ------------------------------------------------------------------------------------------ gradients
def _reference_forward(graph, env):
    """Autograd through the ops' reference semantics (the interpreter without no_grad)."""
    env = dict(env)
    for node in graph.nodes:
        results = op_def(node.op).reference(node.attrs, *[None if v is None else env[v.name] for v in node.inputs])
        env.update({out.name: value for out, value in zip(node.outputs, results)})
    return env[graph.outputs["out"].name]


GRAD_SPEC = _spec(experts__routed=16, experts__top_k=4, experts__shared=2, router=V3_ROUTER,
                  balance={"aux_free": {"gamma": 0.001}})


def _triton_gradients(spec, weights, x, grad_out):
    """(dx, {canonical weight name: grad}) of sum(out * grad_out) through the triton module."""
    graph = _lowered(spec, get_backend("triton"))
    module = TritonMoELayer(graph, {k: v for k, v in weights.items() if k in graph.weights}, fold_weights=False)
    x_t = x.clone().to(module.device).requires_grad_()
    (module(x_t)["out"] * grad_out.to(module.device)).sum().backward()
    return x_t.grad.cpu(), {name: t.grad.cpu() for name, t in module.canonical_weights().items() if t.requires_grad}


def test_gradients_match_reference_autograd():
    spec = GRAD_SPEC
    weights = _weights(spec)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, spec.hidden, generator=gen)
    grad_out = torch.randn(2, 3, spec.hidden, generator=gen)
    dx, got = _triton_gradients(spec, weights, x, grad_out)

    ref_graph = build_graph(spec)
    leaves = {name: w.double().clone().requires_grad_(name != ROUTER_BIAS) for name, w in weights.items()}
    x_r = x.double().clone().requires_grad_()
    (_reference_forward(ref_graph, {"x": x_r, **leaves}) * grad_out.double()).sum().backward()

    assert set(got) == {name for name, t in leaves.items() if t.requires_grad}
    torch.testing.assert_close(dx.double(), x_r.grad, atol=1e-4, rtol=1e-4)
    for name, grad in got.items():
        torch.testing.assert_close(grad.double(), leaves[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_gradients_match_eager_backend():
    eager_module = pytest.importorskip("moe_ir.backends.torch_eager.module", reason="eager backend not present")
    spec = GRAD_SPEC
    weights = _weights(spec)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, spec.hidden, generator=gen)
    grad_out = torch.randn(1, 5, spec.hidden, generator=gen)
    dx, got = _triton_gradients(spec, weights, x, grad_out)

    eager = eager_module.MoELayer(build_graph(spec), weights)
    x_e = x.clone().requires_grad_()
    (eager(x_e).out * grad_out).sum().backward()
    want = {name: t.grad for name, t in eager.canonical_weights().items() if t.requires_grad}
    assert set(got) == set(want)
    torch.testing.assert_close(dx, x_e.grad, atol=1e-5, rtol=1e-4)
    for name, grad in got.items():
        torch.testing.assert_close(grad, want[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------- bench tool
def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_triton.py"
    spec = importlib.util.spec_from_file_location("bench_triton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(ON_GPU, reason="checks the no-GPU exit path")
def test_bench_needs_a_gpu(capsys):
    assert _bench_module().main(["--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_paths_agree_on_a_tiny_layer():
    # The benchmark's torch baseline (grouped_mm over an argsort dispatch) must compute the same layer
    # as the triton module, or its speed ratio means nothing. Timings here are meaningless (CPU).
    bench = _bench_module()
    shape = dict(name="tiny", hidden=64, routed=16, width=32, shared=1, top_k=4, groups=4, kept=2)
    device = torch.device("cuda" if ON_GPU else "cpu")
    result = bench.run_benchmark(shape, [3], device=device, repeats=1, warmup=0, copy_bytes=1 << 20)
    (row,) = result["rows"]
    assert row["routing_agreement"] == 1.0
    # Both paths are bf16 end to end; they differ in accumulation order and where they round.
    assert row["max_abs_diff_vs_grouped_mm"] <= 3e-2 * max(1.0, row["output_scale"])
    assert row["bytes_touched"] == (row["unique_experts"] * 3 * 64 * 32 * 2 + 3 * 64 * 32 * 2 + 16 * 64 * 4)
    assert "| 3 |" in bench._table(result)


# ------------------------------------------------------------------------------------ device selection
_PROBE = """
import os, sys
from moe_ir.backends import get_backend
from moe_ir.builder import build_graph
from moe_ir.passes import run_pipeline
from moe_ir.spec import spec_from_dict
spec = spec_from_dict({"name": "probe", "hidden": 16, "experts": {"routed": 4, "width": 16, "top_k": 2}})
backend = get_backend("triton")
ok, reason = backend.supports(run_pipeline(build_graph(spec), backend.pipeline))
print(os.environ.get("TRITON_INTERPRET"), ok, reason)
"""


@pytest.mark.skipif(ON_GPU, reason="CPU device selection")
@pytest.mark.parametrize("interpret, expected", [(None, "1 True"), ("0", "0 False CPU tensors with TRITON_INTERPRET off")])
def test_cpu_interpreter_selection(interpret, expected):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(expected), done.stdout


def test_gate_up_fused_layout_is_split_back():
    # A graph lowered with fuse-gate-up (w_up holds [E, 2F, H], gate rows first) runs too.
    spec = SPECS["geglu"]
    backend = get_backend("triton")
    graph = run_pipeline(build_graph(spec), backend.pipeline[:-1] + ("fuse-gate-up", "dce"))
    assert any(n.attrs.get("weight_layout") is not None and n.attrs["weight_layout"].value == "gate_up_fused"
               for n in graph.nodes)
    weights = _weights(spec)
    runner = backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights})
    x = torch.randn(1, 4, spec.hidden, generator=torch.Generator().manual_seed(5))
    ref = interpret(build_graph(spec), {"x": x}, weights, dtype=torch.float64)
    torch.testing.assert_close(runner(x)["out"].double(), ref["out"], atol=ATOL, rtol=RTOL)
