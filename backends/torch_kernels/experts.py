"""Expert FFN kernels: activations, the gate/up split, one FFN (oneDNN with fused epilogues at
inference), the grouped FFN over the experts' sorted rows (whole experts side by side on one-thread workers
at inference, one traced graph under torch.compile), the weighted un-permute and the shared-expert gate.
"""
from __future__ import annotations

import concurrent.futures
import os
import threading
import warnings

import torch
import torch.nn.functional as F


def is_gated(activation):
    """Whether the activation reads a gate projection: swiglu, geglu, and clamped SwiGLU, which the kernels take
    as the tuple ("clamped_swiglu", alpha, limit)."""
    return isinstance(activation, tuple) or activation in ("swiglu", "geglu")


def activate(activation, gate, up):
    if isinstance(activation, tuple):  # ("clamped_swiglu", alpha, limit): gpt-oss
        _, alpha, limit = activation
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(alpha * gate)
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate) * up
    if activation == "gelu":
        return F.gelu(up)
    return F.relu(up)


def split_gate_up(w_up, w_gate, b_up, b_gate, activation, layout):
    """(w_up, w_gate, b_up, b_gate) in the separate layout the FFN kernels take. layout "gate_up_fused": w_up
    [..., 2F, H] holds the gate rows first, then the up rows (b_up likewise); the halves are views, no copy.
    A non-gated activation has no gate."""
    if not is_gated(activation):
        return w_up, None, b_up, None
    if layout != "gate_up_fused":
        return w_up, w_gate, b_up, b_gate
    half = w_up.shape[-2] // 2
    w_gate, w_up = w_up[..., :half, :], w_up[..., half:, :]
    if b_up is not None:
        b_gate, b_up = b_up[..., :half], b_up[..., half:]
    return w_up, w_gate, b_up, b_gate


def needs_autograd(*tensors):
    """Whether autograd records ops on these tensors: grad mode is on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def onednn_takes(x):
    """Whether oneDNN's matmul serves x's dtype on this machine: CPU float32, or bfloat16 where the CPU has it."""
    return x.device.type == "cpu" and torch.backends.mkldnn.is_available() and (
        x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def onednn_linear(x, w, b, post="none"):
    """post(x @ w.T + b) for inference (oneDNN's op has no autograd formula): one oneDNN matmul with the
    activation `post` ("none", "swish" = silu, "gelu" (erf) or "relu") fused into its epilogue, where
    oneDNN takes the dtype; else F.linear, then the activation."""
    if onednn_takes(x):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, post, [], "none" if post == "gelu" else "")
    y = F.linear(x, w, b)
    if post == "swish":
        return F.silu(y)
    if post == "gelu":
        return F.gelu(y)
    return F.relu(y) if post == "relu" else y


def ffn_onednn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`ffn` for inference as three oneDNN matmuls: the activation runs in the first one's epilogue and the
    gating product in the second's, so no elementwise pass over the [n, F] hidden rows is left."""
    if isinstance(activation, tuple):  # clamped SwiGLU has no oneDNN epilogue: plain matmuls, then activate
        hidden = activate(activation, onednn_linear(x, w_gate, b_gate), onednn_linear(x, w_up, b_up))
    elif activation in ("swiglu", "geglu"):
        gate = onednn_linear(x, w_gate, b_gate, "swish" if activation == "swiglu" else "gelu")
        # (x @ w_up.T + b_up) * gate, the product in the epilogue; the same value as activate()'s gate * up
        hidden = torch.ops.mkldnn._linear_pointwise.binary(x, gate, w_up, b_up, "mul")
    else:
        hidden = onednn_linear(x, w_up, b_up, activation)
    return onednn_linear(hidden, w_down, b_down)


def ffn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """One FFN on rows x [n, H]: weights [F, H] (up, gate) and [H, F] (down), biases optional.

    Inference on CPU (no autograd, not traced) with 4 rows or more takes `ffn_onednn`. ATen's F.linear
    calls MKL's sgemm, which packs the weight anew on every call; at the ~100 rows an expert gets
    (DeepSeekMoE-16B at 1024 tokens) oneDNN's matmul is ~8% faster per GEMM on this project's CPUs (Intel
    Xeon AVX-512; AMD EPYC AVX2: 15.5 vs 18.9 ms/GFLOP), and its fused epilogues save the activation passes.
    With 1-3 rows the GEMM is a matrix-vector product bound by reading the weight, which MKL streams
    faster. Training keeps F.linear, which autograd differentiates."""
    # is_compiling first: under torch.compile the row count may be a data-dependent size, not to be branched on
    if (not torch.compiler.is_compiling() and x.numel() >= 4 * x.shape[-1] and onednn_takes(x)
            and not needs_autograd(x, w_up, w_down, w_gate, b_up, b_down, b_gate)):
        return ffn_onednn(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)
    up = F.linear(x, w_up, b_up)
    gate = F.linear(x, w_gate, b_gate) if w_gate is not None else None
    return F.linear(activate(activation, gate, up), w_down, b_down)


def _use_grouped_mm(xs, w_up, w_down, w_gate, b_up, b_down, b_gate):
    """grouped_mm serves eager CPU inference without biases; it has no CPU backward. (Under torch.compile
    grouped_ffn never gets here: it takes grouped_ffn_traced, as only bfloat16 passes grouped_mm's meta
    check there.)"""
    if not hasattr(F, "grouped_mm") or xs.device.type != "cpu" or xs.shape[0] == 0:
        return False
    if xs.dtype not in (torch.float32, torch.bfloat16) or any(b is not None for b in (b_up, b_down, b_gate)):
        return False
    if any((w.shape[-1] * w.element_size()) % 16 for w in (w_up, w_down)):
        return False  # its kernels need 16-byte aligned row strides (hidden and width)
    weights = [w for w in (xs, w_up, w_down, w_gate) if w is not None]
    return not (torch.is_grad_enabled() and any(w.requires_grad for w in weights))


def grouped_ffn(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """y [A, H]: row r is FFN_e(x[rows[r]]) for r in expert e's group; rows past every group are 0.

    One GEMM chain (`ffn`) per expert on its contiguous group of rows; empty experts are skipped. Per-expert
    GEMMs with ~T*k/E rows run near the dense GEMM rate on CPU (measured: faster than torch's grouped_mm,
    which does not fuse the activation) and backpropagate on CPU; at inference with at most 3 rows per
    expert, grouped_mm. Under torch.compile: `grouped_ffn_traced`."""
    if torch.compiler.is_compiling():
        return grouped_ffn_traced(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation)
    sizes = group_sizes.tolist()
    kept = sum(sizes)
    if not needs_autograd(x, w_up, w_down, w_gate, b_up, b_down, b_gate):
        if max(sizes, default=0) < 4:
            # Every expert has 1-3 rows (decoding): matrix-vector products bound by reading the weights,
            # where torch's grouped GEMM runs each projection of all experts as one op. Fewer ops than the
            # loop, which counts when other work shares the cores (each op's threads wait for each other).
            xs = x.index_select(0, rows[:kept])
            if _use_grouped_mm(xs, w_up, w_down, w_gate, b_up, b_down, b_gate):
                offs = torch.cumsum(group_sizes, 0).to(torch.int32)
                up = F.grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
                gate = F.grouped_mm(xs, w_gate.transpose(1, 2), offs=offs) if w_gate is not None else None
                y = F.grouped_mm(activate(activation, gate, up), w_down.transpose(1, 2), offs=offs)
                return torch.cat([y, x.new_zeros(rows.shape[0] - kept, x.shape[1])]) if kept < rows.shape[0] else y
        weights = (w_up, w_down, w_gate, b_up, b_down, b_gate)
        return experts_in_place(x, rows, sizes, lambda e, xe: ffn(xe, *(None if w is None else w[e] for w in weights),
                                                                  activation))
    xs = x.index_select(0, rows[:kept])
    # unbind, not w[e]: the backward of one unbind stacks the per-expert gradients once, where each
    # w[e] would allocate and accumulate a zero-filled gradient of the whole [E, ...] stack.
    per_expert = [None if w is None else w.unbind(0) for w in (w_up, w_down, w_gate, b_up, b_down, b_gate)]
    # split, not xs[a:b]: likewise one backward concatenation instead of a zero-filled [A, H] per expert.
    experts = [e for e, size in enumerate(sizes) if size]
    pieces = []
    for e, rows_e in zip(experts, xs.split([sizes[e] for e in experts])):
        pieces.append(ffn(rows_e, *(None if w is None else w[e] for w in per_expert), activation))
    if kept < rows.shape[0]:
        pieces.append(x.new_zeros(rows.shape[0] - kept, x.shape[1]))
    if not pieces:
        return x.new_zeros(rows.shape[0], x.shape[1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def grouped_ffn_traced(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`grouped_ffn` as torch.compile traces it, when a user compiles the eager module itself
    (`torch._dynamo.config.capture_scalar_outputs = True` for fullgraph; the compile backend swaps in one
    opaque op instead, see backends/compile.py): one graph for every routing, no grouped_mm.

    The group ends (`.tolist()` of the cumulative sizes) are unbacked symbols; every expert runs on rows
    ends[e-1]:ends[e] (0 rows is a no-op GEMM), and nothing branches on a size, so no guard ties the graph
    to one routing. The graph holds a GEMM chain per expert, so compile time grows with the expert count.
    Slices, not split: a slice's size is a 2-symbol difference, where split's checks sum every expert's
    size (measured: half the compile time at 64 experts)."""
    weights = (w_up, w_down, w_gate, b_up, b_down, b_gate)
    return experts_traced(x, rows, group_sizes,
                          lambda e, xe: ffn(xe, *(None if w is None else w[e] for w in weights), activation))


def expert_workers(threads):
    """The process's pool of `threads` worker threads for `experts_in_place`, each running torch ops on one
    intra-op thread; made on first use and kept (threads wait on a queue between calls, taking no CPU)."""
    state = expert_workers.__dict__.setdefault("state", {"lock": threading.Lock(), "pools": {}})
    with state["lock"]:
        if state.get("pid") != os.getpid():  # a forked child has none of its parent's threads
            state.update(pid=os.getpid(), pools={})
        if threads not in state["pools"]:
            pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="moe-ir-experts")
            started = threading.Barrier(threads + 1)

            def start_worker():
                # torch reads its process-wide thread count into a thread's OpenMP setting at that thread's
                # first parallel op, which would undo set_num_threads(1) once the caller puts its own count
                # back below (each worker would then run a team of that many OpenMP threads, oversubscribing
                # the cores): get_num_threads() does that first read now.
                torch.get_num_threads()
                torch.set_num_threads(1)  # this thread's intra-op threads (OpenMP, MKL)
                started.wait()  # every submission lands on a fresh thread: none is free until all started

            for _ in range(threads):
                pool.submit(start_worker)
            started.wait()
            # set_num_threads also sets the count that threads created later start with: put back the caller's
            torch.set_num_threads(threads)
            state["pools"][threads] = pool
        return state["pools"][threads]


def reusable_rows(rows, like):
    """An uninitialised [rows, like's width] array of like's dtype and device for `experts_in_place`'s
    result, in memory kept from an earlier call once nothing made from it is alive (on CPU: one buffer per
    dtype, grown to the largest request and kept for the process's life). An array this large (50 MB at
    DeepSeekMoE-16B's 1024 tokens) is past what the C allocator keeps for reuse, so a fresh one comes from
    the OS page by page on every call: ~12k page faults, measured at 5% of the layer's forward. The buffer is
    free when its storage's use count is the cache's alone (every tensor or view made from it adds one): a
    caller that keeps the last result, or a view of it, makes the next call take fresh memory, never
    overwrite it."""
    shape, nbytes = (rows, like.shape[-1]), rows * like.shape[-1] * like.element_size()
    use_count = getattr(torch._C, "_storage_Use_Count", None)  # private to torch: without it, fresh memory
    if like.device.type != "cpu" or use_count is None:  # (an accelerator's caching allocator keeps freed memory)
        return like.new_empty(shape)
    state = reusable_rows.__dict__.setdefault("state", {"lock": threading.Lock(), "buffers": {}})
    key = like.dtype
    with state["lock"]:  # two threads must not take the same free buffer
        storage = state["buffers"].get(key)
        if storage is not None and use_count(storage._cdata) > 1:  # more than the cache's own reference
            return like.new_empty(shape)
        if storage is None or storage.nbytes() < nbytes:
            storage = state["buffers"][key] = torch.empty(shape, dtype=like.dtype, device=like.device).untyped_storage()
        return like.new_empty(0).set_(storage, 0, shape)


def experts_in_place(x, rows, sizes, expert_ffn, side_by_side=True):
    """y [A, H] at inference: the rows of expert e's group (sizes: rows per expert, in order) are
    expert_ffn(e, its rows of x); rows past every group (dropped assignments) are 0. Each expert gathers its
    own rows and its output is written into y in place, so no [A, H] array of gathered rows nor a
    concatenation of every expert's output is made (each a pass over memory, on fresh pages the OS must
    fault in); y itself is memory kept from an earlier call where none of that call's results is alive
    (`reusable_rows`).

    With several intra-op threads and at least two experts with rows per thread, whole experts run side by
    side, one thread each (`expert_workers`), each worker taking the next expert as it comes free, largest
    first: each expert's GEMMs then need no barrier between threads, which a GEMM of ~100 rows split over
    threads waits on, the longer the more other work shares the cores. The caller waits without computing, so
    its thread count and intra-op threads are untouched. Results equal the sequential loop bitwise (each
    expert's GEMMs are the same calls, on one thread, whichever worker runs them). side_by_side=False keeps
    every expert on the caller's thread."""
    y = reusable_rows(rows.shape[0], x)
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    experts = [e for e, size in enumerate(sizes) if size]

    def run(e):
        y[starts[e]:starts[e + 1]] = expert_ffn(e, x.index_select(0, rows[starts[e]:starts[e + 1]]))

    threads = torch.get_num_threads()
    # Dispatch modes (op counters, memory trackers) and autocast are per thread: with either active the
    # experts stay on the caller's thread, so they see every op and compute in the caller's dtype.
    on_workers = (side_by_side and threads > 1 and len(experts) >= 2 * threads and torch._C._len_torch_dispatch_stack() == 0
                  and not torch.is_autocast_enabled(x.device.type))
    if on_workers:
        inference = torch.is_inference_mode_enabled()  # thread-local, as is grad mode: the workers take the caller's
        # Largest experts first, each taken by whichever worker is free: the workers finish within about one
        # expert's time of each other however their speeds differ (another process on a core, a slower
        # virtual CPU), where fixed shares of equal rows waited for the slower one (measured in one interleaved run
        # at 1024 tokens: 0.89x the dense FFN's speed against 0.86x, by median).
        pending = iter(sorted(experts, key=lambda e: -sizes[e]))
        lock = threading.Lock()
        failed = threading.Event()

        def take():
            with lock:
                return None if failed.is_set() else next(pending, None)

        def work():
            with torch.inference_mode(inference), torch.no_grad():
                while (e := take()) is not None:
                    try:
                        run(e)
                    except BaseException:
                        failed.set()  # the other workers take nothing more
                        raise

        futures = [expert_workers(threads).submit(work) for _ in range(threads)]
        concurrent.futures.wait(futures)  # every worker is done with y before the caller goes on
        for done in futures:
            done.result()  # re-raises a worker's exception here
    else:
        for e in experts:
            run(e)
    y[starts[-1]:] = 0  # dropped assignments
    return y


def experts_traced(x, rows, group_sizes, expert_ffn):
    """`experts_in_place` as torch.compile traces it (see grouped_ffn_traced): every expert e runs
    expert_ffn(e, rows) on its slice ends[e-1]:ends[e] of the gathered rows, the ends unbacked symbols."""
    ends = torch.cumsum(group_sizes, 0).tolist()
    kept = ends[-1]
    torch._check(kept <= rows.shape[0])
    start = 0
    for end in ends:  # facts for the compiler: the groups are in order and inside the kept rows
        torch._check(end >= start)
        torch._check(end <= kept)
        start = end
    xs = x.index_select(0, rows[:kept])
    pieces, start = [], 0
    for e, end in enumerate(ends):
        pieces.append(expert_ffn(e, xs[start:end]))
        start = end
    pieces.append(x.new_zeros(rows.shape[0] - kept, x.shape[1]))  # dropped assignments (0 rows when dropless)
    return torch.cat(pieces)


def combine(y, rows, row_weights, tokens):
    """out[t] = Σ_{r: rows[r]=t} row_weights[r] * y[r].

    At inference on CPU in float32/float64: one sparse [tokens, A] x [A, H] product whose row t holds token
    t's weights at its rows, which reads y once (the weighted copy of y that index_add needs is a second
    [A, H] array, written and read again: ~5x the time at DeepSeekMoE-16B's 1024 tokens). Below 64 rows
    (decoding) building the sparse matrix costs more than it saves (~30 us against ~15 us at one token)."""
    # is_compiling first: under torch.compile the row count may be symbolic, not to be branched on
    if (not torch.compiler.is_compiling() and y.device.type == "cpu" and y.dtype in (torch.float32, torch.float64)
            and rows.shape[0] >= 64 and not needs_autograd(y, row_weights)):
        order = torch.argsort(rows, stable=True)
        starts = torch.zeros(tokens + 1, dtype=torch.int64, device=y.device)
        starts[1:] = torch.cumsum(torch.bincount(rows, minlength=tokens), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta" (once per process)
            by_token = torch.sparse_csr_tensor(starts, order, row_weights.to(y.dtype)[order], (tokens, y.shape[0]),
                                               check_invariants=False)
            return by_token @ y
    out = y.new_zeros(tokens, y.shape[1])
    return out.index_add(0, rows, y * row_weights.to(y.dtype).unsqueeze(-1))


def sigmoid_gate(y, x, w):
    return y * torch.sigmoid(F.linear(x, w))
