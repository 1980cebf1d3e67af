"""The inference path of the shared torch kernels (oneDNN GEMMs with the activation in their epilogues, each
expert's rows gathered and written in place) against a float64 reference and against the autograd path,
which keeps F.linear: every activation, with and without biases, empty experts, experts of 1-3 rows (which
stay on F.linear), dropped rows; then in the layer module, in the generated model.py (bitwise), and after a
weight update."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_ir.backends import get_backend
from moe_ir.backends import torch_kernels as K
from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.interpreter import interpret
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import spec_from_dict

from conftest import import_file

ONEDNN = "mkldnn._linear_pointwise"
needs_onednn = pytest.mark.skipif(not K.onednn_takes(torch.zeros(1)),
                                  reason="this torch build has no oneDNN (mkldnn) CPU matmul")

H, F_, E = 24, 16, 6
# Rows per expert: empty experts, 1-3 rows (matrix-vector products, F.linear), 4+ rows (oneDNN); then 3 rows
# past every group, which dropped assignments leave (they must come out as 0).
GROUP_SIZES = [0, 5, 1, 3, 0, 11]
DROPPED = 3
ACTIVATIONS = ["swiglu", "geglu", "gelu", "relu"]


class OpNames(TorchDispatchMode):
    """Names of the aten/mkldnn ops run while active."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def expert_tensors(activation, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    gated = activation in ("swiglu", "geglu")
    w_up, w_down = rnd(E, F_, H) * H ** -0.5, rnd(E, H, F_) * F_ ** -0.5
    w_gate = rnd(E, F_, H) * H ** -0.5 if gated else None
    b_up, b_down = (rnd(E, F_) * 0.3, rnd(E, H) * 0.3) if bias else (None, None)
    b_gate = rnd(E, F_) * 0.3 if bias and gated else None
    a = sum(GROUP_SIZES) + DROPPED
    x = rnd(9, H)
    rows = torch.randint(0, 9, (a,), generator=gen)
    return x, rows, torch.tensor(GROUP_SIZES), [w_up, w_down, w_gate, b_up, b_down, b_gate]


def reference(x, rows, sizes, weights, activation):
    """y row by row in float64 with plain matmuls: an implementation independent of the kernels."""
    w_up, w_down, w_gate, b_up, b_down, b_gate = [None if w is None else w.double() for w in weights]
    act = {"swiglu": lambda g, u: torch.nn.functional.silu(g) * u, "geglu": lambda g, u: torch.nn.functional.gelu(g) * u,
           "gelu": lambda g, u: torch.nn.functional.gelu(u), "relu": lambda g, u: torch.relu(u)}[activation]
    y = torch.zeros(rows.shape[0], x.shape[1], dtype=torch.float64)
    r = 0
    for e, size in enumerate(sizes):
        for _ in range(size):
            v = x[rows[r]].double()
            up = w_up[e] @ v + (0 if b_up is None else b_up[e])
            gate = None if w_gate is None else w_gate[e] @ v + (0 if b_gate is None else b_gate[e])
            y[r] = w_down[e] @ act(gate, up) + (0 if b_down is None else b_down[e])
            r += 1
    return y


@needs_onednn
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_inference_path_equals_autograd_path(activation, bias):
    x, rows, sizes, weights = expert_tensors(activation, bias)
    want = reference(x, rows, GROUP_SIZES, weights, activation)
    with torch.no_grad(), OpNames() as ops:
        fast = K.grouped_ffn(x, rows, sizes, *weights, activation)
    assert ONEDNN in ops.names  # the expert of 5 and of 11 rows
    train_weights = [None if w is None else w.clone().requires_grad_(True) for w in weights]
    with OpNames() as ops:
        slow = K.grouped_ffn(x, rows, sizes, *train_weights, activation)
    assert ONEDNN not in ops.names and slow.requires_grad  # autograd needs F.linear
    assert fast.shape == slow.shape == want.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slow.detach().double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[-DROPPED:], torch.zeros(DROPPED, H))
    # and the autograd path's gradients exist for every weight (the fast path never serves training)
    slow.square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in train_weights if w is not None)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True], ids=["grouped_mm", "bias-f-linear"])
def test_few_rows_take_no_onednn(bias):
    """Experts of at most 3 rows are matrix-vector products: torch's grouped GEMM (one op per projection)
    where it applies (no biases), else F.linear; no oneDNN op runs."""
    x, rows, _, weights = expert_tensors("swiglu", bias)
    sizes = torch.tensor([1, 3, 0, 2, 1, 2])
    rows = rows[: int(sizes.sum()) + 2]  # and 2 dropped rows
    with torch.no_grad(), OpNames() as ops:
        y = K.grouped_ffn(x, rows, sizes, *weights, "swiglu")
    assert ONEDNN not in ops.names
    assert ("aten._grouped_mm" in ops.names) == (not bias and hasattr(torch.nn.functional, "grouped_mm"))
    torch.testing.assert_close(y.double(), reference(x, rows, sizes.tolist(), weights, "swiglu"), rtol=1e-5, atol=1e-6)
    assert torch.equal(y[-2:], torch.zeros(2, H))


@needs_onednn
@pytest.mark.skipif(not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no bfloat16 oneDNN matmul")
def test_bfloat16_inference_path():
    x, rows, sizes, weights = expert_tensors("swiglu", True)
    want = reference(x, rows, GROUP_SIZES, weights, "swiglu")
    with torch.no_grad(), OpNames() as ops:
        y = K.grouped_ffn(x.bfloat16(), rows, sizes, *[w.bfloat16() for w in weights], "swiglu")
    assert ONEDNN in ops.names and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=3e-2, atol=3e-2)


@needs_onednn
def test_dense_ffn_inference_path():
    """`ffn` (shared experts, dense layers): oneDNN at inference, F.linear under autograd, same values."""
    _, _, _, weights = expert_tensors("geglu", True, seed=4)
    w = [None if t is None else t[2] for t in weights]
    x = torch.randn(2, 7, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), OpNames() as ops:
        fast = K.ffn(x, *w, "geglu")
    assert ONEDNN in ops.names and fast.shape == (2, 7, H)
    slow = K.ffn(x.requires_grad_(True), *w, "geglu")
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# in the layer module and the generated model.py


def layer_spec(**over):
    data = {"hidden": 16, "experts": {"routed": 8, "width": 8, "top_k": 2, "shared": 1}}
    data.update(over)
    return spec_from_dict(data)


@needs_onednn
@pytest.mark.parametrize("capacity", [None, 0.5])
def test_module_inference_path_matches_reference(capacity):
    """(Moved from test_eager's grouped_mm test.) At inference the module takes the oneDNN path, empty
    experts and dropped rows included, and equals the reference interpreter; with grad enabled it takes
    the F.linear loop, with the same values."""
    spec = layer_spec(**({"capacity": {"factor": capacity}} if capacity else {}))
    graph = build_graph(spec)
    weights = init_weights(graph, 2)
    # A router that sends every token to experts 0-3 (largest logits) and none to 4-7: empty experts.
    weights["router.weight"] = torch.cat([torch.randn(4, 16), torch.full((4, 16), 0.0)]) * 0.5
    x = torch.randn(1, 24, 16, generator=torch.Generator().manual_seed(3)).abs()
    weights["router.weight"][:4] = weights["router.weight"][:4].abs()
    ref = interpret(graph, {"x": x}, weights, dtype=torch.float32)
    module = MoELayer(graph, weights).eval()
    with torch.no_grad(), OpNames() as ops:
        res = module(x)
    assert ONEDNN in ops.names
    assert (res.routing["expert_idx"].reshape(-1).bincount(minlength=8) == 0).any()  # some expert gets no token
    torch.testing.assert_close(res.out, ref["out"], rtol=1e-5, atol=1e-6)
    with OpNames() as ops:
        train_out = module(x).out  # grad enabled: the F.linear loop
    assert ONEDNN not in ops.names
    torch.testing.assert_close(train_out.detach(), res.out, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_generated_model_equals_module_bitwise_at_inference(tmp_path):
    """model.py carries the same kernels: under no_grad both take the oneDNN path and agree bit for bit."""
    spec = layer_spec(experts={"routed": 8, "width": 8, "top_k": 2, "shared": 2, "activation": "geglu",
                               "bias": True})
    module = MoELayer.from_spec(spec, seed=1, training=False).eval()
    get_backend("torch").build(spec, module.graph, module.canonical_weights(), tmp_path / "o")
    from safetensors.torch import load_file

    generated = import_file(tmp_path / "o" / "model.py", "generated_fast_inference").MoELayer().eval()
    generated.load_state_dict(load_file(str(tmp_path / "o" / "weights.safetensors")), strict=True)
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), OpNames() as ops:
        out = generated(x)[0]
        want = module(x).out
    assert ONEDNN in ops.names
    assert torch.equal(out, want)


@needs_onednn
@pytest.mark.parametrize("passes", [(), ("fuse-gate-up", "dce")], ids=["separate", "gate-up-fused"])
def test_weight_update_reaches_inference(passes):
    """Nothing the inference path keeps outlives a weight write: after an in-place update (an optimizer step,
    load_state_dict) the next forward equals a module built fresh from the new weights."""
    spec = layer_spec()
    graph = run_pipeline(build_graph(spec), passes) if passes else build_graph(spec)
    weights = init_weights(graph, 6)
    module = MoELayer(graph, weights).eval()
    x = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        before = module(x).out
        for p in module.parameters():
            if p.dim() == 3:  # the routed experts' stacks
                p.mul_(1.5).add_(0.01)
        after = module(x).out
    fresh = MoELayer(graph, {k: v.detach().clone() for k, v in module.canonical_weights().items()}).eval()
    with torch.no_grad():
        assert torch.equal(after, fresh(x).out)
    assert not torch.allclose(after, before)


# ---------------------------------------------------------------------------------------------------
# the sparse un-permute


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_unpermute_equals_the_sum(dtype):
    """combine at inference (one sparse product): tokens with several rows, with none, rows of dropped
    assignments (y 0), in any order; equal to the float64 sum written here, and to the autograd path."""
    gen = torch.Generator().manual_seed(3)
    tokens, h = 19, 5
    # 72 rows (the sparse path takes 64 or more) in no order; tokens 4, 17 and 18 get none
    rows = torch.randint(0, 17, (72,), generator=gen)
    rows[rows == 4] = 3
    y = torch.randn(rows.shape[0], h, generator=gen, dtype=dtype)
    y[-2:] = 0  # dropped
    row_weights = torch.rand(rows.shape[0], generator=gen)
    want = torch.zeros(tokens, h, dtype=torch.float64)
    for r, t in enumerate(rows.tolist()):
        want[t] += row_weights[r].double() * y[r].double()
    with torch.no_grad():
        fast = K.combine(y, rows, row_weights, tokens)
    slow = K.combine(y.clone().requires_grad_(True), rows, row_weights, tokens)
    assert fast.dtype == dtype and fast.layout == torch.strided and slow.requires_grad
    torch.testing.assert_close(fast.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(fast[[4, 17, 18]], torch.zeros(3, h, dtype=dtype))


# ---------------------------------------------------------------------------------------------------
# experts side by side on one-thread workers


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_experts_side_by_side_equal_the_sequential_loop(two_threads, mode):
    """With 2 intra-op threads and 4+ experts with rows, experts run on the worker threads: the output equals
    each expert's FFN written in this test (bitwise: the same calls), dropped rows are 0, the caller's thread
    count is unchanged, and it works under inference_mode (an inference tensor written by the workers) and
    no_grad alike."""
    gen = torch.Generator().manual_seed(5)
    sizes = [7, 0, 5, 9, 4, 0, 6, 8]
    dropped = 3
    x = torch.randn(20, H, generator=gen)
    rows = torch.randint(0, 20, (sum(sizes) + dropped,), generator=gen)
    w = torch.randn(len(sizes), F_, H, generator=gen)
    used = []

    def expert_ffn(e, xe):
        used.append(e)
        return torch.relu(xe @ w[e].T) @ w[e]

    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        y = K.experts_in_place(x, rows, sizes, expert_ffn)
    assert sorted(used) == [e for e, s in enumerate(sizes) if s]
    assert torch.get_num_threads() == 2
    start = 0
    for e, size in enumerate(sizes):
        want = torch.relu(x[rows[start:start + size]] @ w[e].T) @ w[e]
        assert torch.equal(y[start:start + size], want)
        start += size
    assert torch.equal(y[start:], torch.zeros(dropped, H))


def test_expert_worker_errors_reach_the_caller(two_threads):
    """An expert's exception on a worker thread is raised in the caller, and the workers stay usable."""
    x, rows, sizes = torch.randn(8, H), torch.arange(8), [2, 2, 2, 2]

    def failing(e, xe):
        if e == 2:
            raise ValueError("expert 2 failed")
        return xe

    with torch.no_grad():
        with pytest.raises(ValueError, match="expert 2 failed"):
            K.experts_in_place(x, rows, sizes, failing)
        assert torch.equal(K.experts_in_place(x, rows, sizes, lambda e, xe: xe * e), x * torch.arange(4).repeat_interleave(2)[:, None])


def test_expert_workers_run_one_intra_op_thread(two_threads):
    """Each worker runs its ops on one thread even after the caller put its own count back: torch copies its
    process-wide count into a thread's OpenMP setting at that thread's first parallel op, which would give
    every worker a team of the caller's size (2 workers x 2 threads on 2 cores)."""
    pool = K.expert_workers(2)
    counts = [pool.submit(torch.get_num_threads).result() for _ in range(4)]
    assert counts == [1, 1, 1, 1]
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("side_by_side", [True, False])
def test_expert_outputs_reuse_memory_only_once_released(two_threads, side_by_side):
    """experts_in_place writes into memory kept from an earlier call (no fresh pages on every call), but
    only once nothing made from that call's result is alive: a result or a view of it that the caller keeps
    is never overwritten by the next call, and every result equals the FFNs computed here."""
    gen = torch.Generator().manual_seed(9)
    sizes, rows_total = [6, 4, 0, 5, 7], 25
    w = torch.randn(len(sizes), F_, H, generator=gen)

    def expert_ffn(e, xe):
        return torch.relu(xe @ w[e].T) @ w[e]

    def want(x, rows):
        out, start = torch.zeros(rows_total, H), 0
        for e, size in enumerate(sizes):
            out[start:start + size] = expert_ffn(e, x[rows[start:start + size]])
            start += size
        return out

    def call():
        x = torch.randn(12, H, generator=gen)
        rows = torch.randint(0, 12, (rows_total,), generator=gen)
        with torch.no_grad():
            return K.experts_in_place(x, rows, sizes, expert_ffn, side_by_side), want(x, rows)

    K.reusable_rows.__dict__.pop("state", None)  # start from an empty cache (other tests fill it)
    first, first_want = call()  # the cache's buffer
    cached = first.data_ptr()
    kept = first.clone()
    second, second_want = call()  # `first` is alive: fresh memory
    assert second.data_ptr() != cached
    assert torch.equal(first, kept) and torch.equal(first, first_want) and torch.equal(second, second_want)
    del first, second
    third, third_want = call()  # nothing made from the buffer is alive: the buffer again
    assert third.data_ptr() == cached and torch.equal(third, third_want)
    view = third[3:9]
    view_kept = view.clone()
    del third
    fourth, fourth_want = call()  # a view of `third` is alive
    assert fourth.data_ptr() != cached
    assert torch.equal(view, view_kept) and torch.equal(fourth, fourth_want)
    del view, fourth
    fifth, fifth_want = call()
    assert fifth.data_ptr() == cached and torch.equal(fifth, fifth_want)


def test_model_frees_a_layers_expert_outputs_before_the_next_layer():
    """The module's run drops each intermediate after its last reader, so at inference one MoE layer's
    [T*k, H] expert outputs are gone before the next layer's experts run (peak memory of one layer, not the
    sum of all), while the logits stay those of a run that kept everything."""
    import weakref

    import yaml

    from moe_ir.backends.torch_eager import MoEModel
    from moe_ir.model_spec import model_spec_from_dict

    from conftest import tiny_model_yaml

    spec = model_spec_from_dict(yaml.safe_load(tiny_model_yaml("freed", "{kind: gqa, heads: 4, kv_heads: 2}",
                                                               layers=3)))
    model = MoEModel.from_spec(spec, training=False, seed=2).eval()
    alive_at_call = []
    outputs = []

    def recording_kernel(*args):
        alive_at_call.append([ref() is not None for ref in outputs])
        y = K.grouped_ffn(*args)
        outputs.append(weakref.ref(y))
        return y

    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids).logits
        model.grouped_ffn_kernel = recording_kernel
        got = model(ids).logits
    assert alive_at_call == [[], [False]]  # two MoE layers; the first one's outputs freed before the second
    assert torch.equal(got, want)


def test_expert_workers_take_experts_as_they_come_free(two_threads):
    """Experts go largest first to whichever worker is free: while one worker is held up in the largest
    expert (here a sleep, as another process on its core would), the other takes every other expert,
    instead of waiting on a fixed half; the result is still each expert's FFN."""
    import threading
    import time

    sizes = [9, 2, 3, 2, 4, 2, 3, 2]
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(2))
    rows = torch.arange(sum(sizes)) % 30
    ran_on = {}

    def expert_ffn(e, xe):
        ran_on[e] = threading.get_ident()
        if e == 0:
            time.sleep(0.5)
        return xe * (e + 1)

    with torch.no_grad():
        y = K.experts_in_place(x, rows, sizes, expert_ffn)
    # expert 0 on one worker, every other expert on the other one
    assert len({ran_on[e] for e in range(1, len(sizes))}) == 1 and ran_on[1] != ran_on[0]
    assert torch.equal(y, x[rows] * torch.repeat_interleave(torch.arange(1, len(sizes) + 1), torch.tensor(sizes))[:, None])
