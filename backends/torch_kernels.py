"""Fast, autograd-friendly torch implementations of the MoE ops and the whole-model ops (embedding,
RMSNorm, RoPE, causal attention, MLA, and both attentions in decode form with a KV cache), depending on
torch alone.

Each function has the semantics of the op of the same name in moe_ir/ir/ops.py or model_ops.py (the
reference), written for speed: routing stays vectorised, expert FFNs run as one GEMM per expert on
contiguous rows of a token array sorted by expert (never a tokens x experts x hidden tensor), the
un-permute is an index_add over the sorted rows, and attention runs through the fused
scaled_dot_product_attention kernel rather than a materialised [S, S] score matrix.

This module imports nothing but torch and the standard library on purpose: the code generator copies the functions a
spec needs verbatim into the standalone `model.py` it writes, so the generated layer and the eager
module run the same instructions and agree bitwise. Options are therefore plain strings, ints and bools
here, not moe_ir enums.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
import threading
import warnings

import torch
import torch.nn.functional as F


def router_logits(x, w, out_dtype):
    """x @ w.T in the router dtype; float64 inputs stay float64 (that is how the oracle is compared)."""
    dtype = torch.float64 if x.dtype == torch.float64 else out_dtype
    return F.linear(x.to(dtype), w.to(dtype))


def router_noise(logits, x, w_noise, std, generator=None):
    """Noisy top-k gating (Shazeer et al. 2017): logits + std * N(0,1) * softplus(x w_noise^T), training only."""
    noise = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return logits + std * noise * F.softplus(F.linear(x.to(logits.dtype), w_noise.to(logits.dtype)))


def score(logits, fn):
    return torch.softmax(logits, dim=-1) if fn == "softmax" else torch.sigmoid(logits)


def route_topk(scores, bias, k, groups, kept, group_score):
    """(expert_idx [T,k], weights [T,k]): select on scores + bias, weigh by the unbiased scores."""
    select = scores if bias is None else scores + bias
    if groups > 1:
        t, e = select.shape
        grouped = select.view(t, groups, e // groups)
        if group_score == "max":
            gscore = grouped.amax(dim=-1)
        else:
            gscore = grouped.topk(2, dim=-1).values.sum(dim=-1)
        keep = torch.zeros(t, groups, dtype=torch.bool, device=select.device)
        keep.scatter_(1, gscore.topk(kept, dim=-1).indices, True)
        # -inf, not 0: a biased score can be negative and must still lose to every kept expert.
        select = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(t, e)
    expert_idx = select.topk(k, dim=-1).indices
    return expert_idx, scores.gather(1, expert_idx)


def sparsemixer_route(logits, k, eps):
    """(expert_idx [T,k], weights [T,k]) of SparseMixer at inference (PhiMoE): pick j is the top logit of the
    experts not picked yet, weighted by the softmax over those within (top - logit) / max(|logit|, top) <= 2*eps."""
    remaining = logits
    picks, weights = [], []
    for _ in range(k):
        top, idx = remaining.max(dim=-1, keepdim=True)
        outside = (top - logits) / logits.abs().clamp(min=top) > 2 * eps
        gates = torch.softmax(remaining.masked_fill(outside, float("-inf")), dim=-1)
        picks.append(idx)
        weights.append(gates.gather(1, idx))
        remaining = remaining.scatter(1, idx, float("-inf"))
    return torch.cat(picks, dim=1), torch.cat(weights, dim=1)


def scale_weights(weights, normalize, scale):
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale if scale != 1.0 else weights


def count_ids(ids, bins):
    """counts [bins] int64 of ids (each in [0, bins)): torch.bincount with a length known before the run
    (bincount's output length depends on the data, which torch.compile must break its graph for)."""
    return torch.zeros(bins, dtype=torch.int64, device=ids.device).scatter_add(0, ids, torch.ones_like(ids))


def dispatch(expert_idx, weights, num_experts):
    """Dropless dispatch: the T*k assignments sorted by expert (stable, so token order within an expert).

    Returns rows (token of each sorted assignment), row_weights and group_sizes [E]."""
    k = expert_idx.shape[1]
    order = torch.argsort(expert_idx.reshape(-1), stable=True)
    rows = order // k
    row_weights = weights.reshape(-1)[order]
    group_sizes = count_ids(expert_idx.reshape(-1), num_experts)
    return rows, row_weights, group_sizes


def expert_capacity(tokens, top_k, num_experts, capacity_factor):
    """Assignments one expert takes under a capacity factor: ceil(factor * T * k / E), at least 1 (the
    capacity rule of every torch backend; `tokens` may be a symbolic size under torch.export)."""
    return max(1, math.ceil(capacity_factor * tokens * top_k / num_experts))


def dispatch_capacity(expert_idx, weights, num_experts, capacity_factor, drop_rule):
    """Dispatch with capacity ceil(factor*T*k/E) per expert; assignments over it move to the tail with
    weight 0, so the dropped token keeps only its residual (and its other experts).

    drop_rule "score": an expert keeps its highest-weight assignments; "position": slot-major order
    (every token's first choice before any second choice), then token order, as in GShard/Switch."""
    t, k = expert_idx.shape
    a = t * k
    flat_expert = expert_idx.reshape(-1)
    flat_weight = weights.reshape(-1)
    capacity = expert_capacity(t, k, num_experts, capacity_factor)
    arange = torch.arange(a, device=flat_expert.device)
    if drop_rule == "position":
        # rank of assignment (token i, slot j) in slot-major order is j*T + i
        slot_major_rank = arange.view(t, k).t().reshape(-1)
        rank = torch.empty_like(slot_major_rank)
        rank[slot_major_rank] = arange
        order = torch.argsort(flat_expert * a + rank, stable=True)
    else:
        by_weight = torch.argsort(-flat_weight.detach(), stable=True)
        order = by_weight[torch.argsort(flat_expert[by_weight], stable=True)]
    sorted_expert = flat_expert[order]
    position = arange - torch.searchsorted(sorted_expert, sorted_expert, right=False)
    kept = torch.empty_like(position, dtype=torch.bool)
    kept[order] = position < capacity
    key = torch.where(kept, flat_expert, torch.full_like(flat_expert, num_experts))
    final = torch.argsort(key, stable=True)
    rows = final // k
    row_weights = flat_weight[final] * kept[final].to(flat_weight.dtype)
    group_sizes = count_ids(key, num_experts + 1)[:num_experts]
    return rows, row_weights, group_sizes


def expert_choice(scores, capacity_factor, top_k):
    """Each expert takes its top-C tokens by score, C = min(T, ceil(factor*T*top_k/E)) (Zhou et al. 2022)."""
    t, e = scores.shape
    c = min(t, expert_capacity(t, top_k, e, capacity_factor))
    row_weights, rows = scores.t().topk(c, dim=-1)
    group_sizes = torch.full((e,), c, dtype=torch.int64, device=scores.device)
    return rows.reshape(-1), row_weights.reshape(-1), group_sizes


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


# ---------------------------------------------------------------------------------------------------
# balance losses (Switch arXiv 2101.03961, DeepSeekMoE arXiv 2401.06066, DeepSeek-V3 sequence-wise, ST-MoE z-loss);
# each returns alpha * loss as a 0-d tensor, differentiable in scores


def selection_counts(expert_idx, num_experts, dtype):
    return count_ids(expert_idx.reshape(-1), num_experts).to(dtype)


def switch_loss(alpha, scores, expert_idx):
    """Switch Transformer: α·N·Σ f_i·P_i, f_i = share of tokens whose top-1 is i, P_i = mean score."""
    t, e = scores.shape
    f = selection_counts(expert_idx[:, 0], e, scores.dtype) / t
    return alpha * e * torch.sum(f * scores.mean(dim=0))


def expert_loss(alpha, scores, expert_idx, top_k):
    """DeepSeekMoE expert level: α1·Σ f_i·P_i, f_i = N'/(K'T)·#selections of i."""
    t, e = scores.shape
    f = selection_counts(expert_idx, e, scores.dtype) * (e / (top_k * t))
    return alpha * torch.sum(f * scores.mean(dim=0))


def device_loss(alpha, scores, expert_idx, top_k, devices):
    """DeepSeekMoE device level: α2·Σ_d f'_d·P'_d over D contiguous expert groups."""
    t, e = scores.shape
    f = selection_counts(expert_idx, e, scores.dtype) * (e / (top_k * t))
    p = scores.mean(dim=0)
    return alpha * torch.sum(f.view(devices, -1).mean(dim=-1) * p.view(devices, -1).sum(dim=-1))


def sequence_loss(alpha, scores, expert_idx, top_k, seq_len):
    """DeepSeek-V3 sequence-wise: the expert-level loss per sequence on per-token normalised scores."""
    t, e = scores.shape
    b = t // seq_len
    s = (scores / scores.sum(dim=-1, keepdim=True)).view(b, seq_len, e)
    counts = torch.zeros(b, seq_len, e, dtype=scores.dtype, device=scores.device)
    counts.scatter_add_(2, expert_idx.view(b, seq_len, -1),
                        torch.ones(b, seq_len, top_k, dtype=scores.dtype, device=scores.device))
    f = counts.sum(dim=1) * (e / (top_k * seq_len))
    return alpha * (f * s.mean(dim=1)).sum(dim=-1).mean()


def z_loss(alpha, logits):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (at least float32)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return alpha * torch.logsumexp(logits, dim=-1).pow(2).mean()


def update_bias(bias, tokens_per_expert, gamma):
    """Aux-loss-free balancing (arXiv 2408.15664): b_i += γ·sign(mean load − load_i), outside autograd."""
    with torch.no_grad():
        load = tokens_per_expert.to(bias.device, torch.float64)
        bias.add_(torch.sign(load.mean() - load).to(bias.dtype), alpha=gamma)
    return bias


# ---------------------------------------------------------------------------------------------------
# whole-model ops (moe_ir/ir/model_ops.py): embedding, RMSNorm, RoPE and causal self-attention.
# Nothing here branches on data: the branches read shapes of weights and string options only, so the
# same functions serve eager, torch.compile (dynamic B, S) and torch.export.


def embedding(ids, weight):
    """ids [B, S] int64 -> rows of weight [V, H]: [B, S, H]."""
    return F.embedding(ids, weight)


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; the statistics in float32 even for
    bfloat16/float16 activations (as transformers computes them), float64 stays float64."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x, weight, bias, eps):
    """LayerNorm over the last dim (biased variance), computed in float32 (float64 stays), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = torch.nn.functional.layer_norm(x.to(compute), (x.shape[-1],), weight.to(compute),
                                       None if bias is None else bias.to(compute), eps)
    return y.to(x.dtype)


def rope_inverse_frequencies(dim, rope, compute, device, long=False):
    """[dim/2] inverse frequencies 1/theta^(2i/dim) of the rotated dims. rope = (theta, layout, rotary_dim, yarn,
    attention_factor, llama3, longrope); yarn = (factor, original_max_positions, beta_fast, beta_slow, truncate) or
    None; llama3 = (factor, original_max_positions, low_freq_factor, high_freq_factor) or None; longrope =
    (short_factors, long_factors, original_max_positions, short_mscale, long_mscale) or None: each frequency
    divided by its factor (the long ones when `long`). YaRN blends them with
    the interpolated 1/(factor theta^(2i/dim)) along a linear ramp between the dims that turn beta_fast and
    beta_slow times over the original context. Llama 3 divides the long wavelengths (above original / low) by
    the factor, keeps the short ones (below original / high) and blends linearly in original / wavelength
    between them."""
    theta, yarn, llama3, longrope = rope[0], rope[3], rope[5], rope[6]
    powers = theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(compute) / dim)
    original = 1.0 / powers
    if longrope is not None:
        factors = torch.tensor(longrope[1] if long else longrope[0], dtype=torch.float32, device=device).to(compute)
        return 1.0 / (factors * powers)
    if llama3 is not None:
        factor, length, low, high = llama3
        wavelength = 2 * math.pi / original
        scaled = torch.where(wavelength > length / low, original / factor, original)
        if high > low:
            blend = (length / wavelength - low) / (high - low)
            between = (wavelength <= length / low) & (wavelength >= length / high)
            scaled = torch.where(between, (1 - blend) * original / factor + blend * original, scaled)
        return scaled
    if yarn is None:
        return original
    factor, length, beta_fast, beta_slow, truncate = yarn
    low = dim * math.log(length / (beta_fast * 2 * math.pi)) / (2 * math.log(theta))
    high = dim * math.log(length / (beta_slow * 2 * math.pi)) / (2 * math.log(theta))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=compute, device=device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return 1.0 / (factor * powers) * (1 - keep) + original * keep


def rope_angles_cos_sin(freqs, rope, like, long=False):
    """cos and sin of the angles freqs (times the attention factor, and LongRoPE's short or long mscale), in
    like's dtype."""
    cos, sin = freqs.cos(), freqs.sin()
    factor = rope[4] if rope[6] is None else rope[4] * rope[6][4 if long else 3]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos.to(like.dtype), sin.to(like.dtype)


def rope_cos_sin(seq_len, dim, rope, like):
    """cos, sin [S, dim/2] of positions 0..S-1; angles in float32 (float64 stays), then like's dtype. LongRoPE
    takes its long factors when S passes the original context."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    long = rope[6] is not None and seq_len > rope[6][2]
    inv_freq = rope_inverse_frequencies(dim, rope, compute, like.device, long)
    freqs = torch.arange(seq_len, device=like.device, dtype=compute)[:, None] * inv_freq[None, :]
    return rope_angles_cos_sin(freqs, rope, like, long)


def rope_dim(rope, head_dim):
    """Dims of each head that RoPE rotates (rotary_dim, or the whole head)."""
    return rope[2] if rope[2] is not None else head_dim


def apply_rope(x, cos, sin, layout):
    """x [..., S, d] rotated by cos/sin [S, r/2]: the first r dims rotate, the rest pass through (partial rotary).
    layout "half": dim j pairs with j + r/2; "interleaved": dim 2j pairs with 2j+1, and the result comes out
    de-interleaved ([even, odd]) as DeepSeek-V3 writes it (queries and keys alike, so q.k is the same as with the
    complex form)."""
    r = 2 * cos.shape[-1]
    rest = x[..., r:]
    x = x[..., :r]
    if layout == "half":
        x1, x2 = x[..., :r // 2], x[..., r // 2:]
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attention_with_sinks(q, k, v, scale, visible, sinks):
    """Attention whose softmax has one more logit per head, sinks [h], with no value (gpt-oss): q [B, h, S, d],
    k [B, hk, L, d], v [B, hk, L, dv], visible bool [B|1, 1, S, L] -> [B, h, S, dv]. Written out (SDPA takes no
    sink); the softmax in float32 (float64 stays)."""
    b, h, s, _ = q.shape
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf")).to(compute)
    sink = sinks.to(compute).view(1, h, 1, 1).expand(b, h, s, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.matmul(probs.to(q.dtype), v)


def causal_seen(s, device, window=None, chunk=None):
    """bool [S, S]: query i sees key j <= i (with a sliding window W only i - W < j; with chunks of C only
    j // C == i // C)."""
    pos = torch.arange(s, device=device)
    seen = pos[None, :] <= pos[:, None]
    if window is not None:
        seen = seen & (pos[:, None] - pos[None, :] < window)
    if chunk is not None:
        seen = seen & (pos[:, None] // chunk == pos[None, :] // chunk)
    return seen


def causal_attention(q, k, v, scale, window=None, chunk=None):
    """q [B, h, S, d], k [B, hk, S, d], v [B, hk, S, dv] -> [B, S, h*dv]; query head i reads kv head
    i // (h / hk); with a sliding window W query i sees only keys j with i - W < j <= i, with chunks of C only
    those with j // C == i // C. The kv heads are expanded before the fused kernel rather than passed with
    enable_gqa, which not every SDPA backend (nor torch.export on every torch) takes."""
    b, h, s, _ = q.shape
    rep = h // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if window is None and chunk is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_seen(s, q.device, window, chunk), scale=scale)
    return y.transpose(1, 2).reshape(b, s, h * v.shape[-1])


def attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim, qk_norm,
                  rope_layout, norm_eps, clip=None):
    """q [B, heads, S, d], k and v [B, kv_heads, S, d] of the tokens x [B, S, H]: projected, q and k normalised
    ("full": the whole projection, OLMoE; "head": each head, Qwen3), clamped to [-clip, clip] after the projection
    and a "full" norm (OLMoE, DBRX), and rotated by cos/sin ("head_after_rope": rotated, then each head
    normalised, Hunyuan)."""
    b, s, _ = x.shape
    q, k, v = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)
    if qk_norm == "full":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q = q.view(b, s, heads, head_dim).transpose(1, 2)
    k = k.view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = v.view(b, s, kv_heads, head_dim).transpose(1, 2)
    if qk_norm == "head":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    q, k = apply_rope(q, cos, sin, rope_layout), apply_rope(k, cos, sin, rope_layout)
    if qk_norm == "head_after_rope":
        q, k = rms_norm(q, q_norm, norm_eps), rms_norm(k, k_norm, norm_eps)
    elif qk_norm == "weightless_after_rope":  # Llama 4: no weight, the statistics in float32
        q, k = unit_rms(q, norm_eps), unit_rms(k, norm_eps)
    return q, k, v


def unit_rms(x, eps):
    """x * rsqrt(mean(x^2) + eps) over the last dim, no weight; in float32 (float64 stays), rounded to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(compute)
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def tuned_queries(q, positions, temperature):
    """q [B, h, S, d] times Llama 4's temperature 1 + scale * ln(1 + floor((p + 1) / floor_scale)) of each
    token's position (positions [S] or [B, S]); temperature = (floor_scale, scale) or None."""
    if temperature is None:
        return q
    floor_scale, coefficient = temperature
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scales = torch.log1p(torch.floor((positions.to(compute) + 1.0) / floor_scale)) * coefficient + 1.0
    scales = scales[None, None, :, None] if scales.dim() == 1 else scales[:, None, :, None]
    return (q.to(compute) * scales).to(q.dtype)


def attention(x, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o, q_norm, k_norm, sinks, heads, kv_heads, head_dim, qk_norm,
              rope, norm_eps, scale, window, clip=None, chunk=None, temperature=None):
    """Causal MHA/GQA self-attention with RoPE (rope: rope_inverse_frequencies) on x [B, S, H] (positions
    0..S-1), softmax scale `scale`; optional sinks [heads] (gpt-oss), q/k/v clamped to [-clip, clip] (DBRX),
    sliding window, chunks and query temperature (Llama 4: tuned_queries)."""
    cos, sin = rope_cos_sin(x.shape[1], rope_dim(rope, head_dim), rope, x)
    q, k, v = attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim,
                            qk_norm, rope[1], norm_eps, clip)
    q = tuned_queries(q, torch.arange(x.shape[1], device=x.device), temperature)
    if sinks is not None:
        seen = causal_seen(x.shape[1], x.device, window, chunk)
        return F.linear(merge_heads(attention_with_sinks(q, k, v, scale, seen, sinks)), w_o, b_o)
    return F.linear(causal_attention(q, k, v, scale, window, chunk), w_o, b_o)


def mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos, sin, heads, kv_lora_rank,
                qk_nope_head_dim, qk_rope_head_dim, rope_layout, norm_eps, latent_scales=(1.0, 1.0)):
    """Of the tokens x [B, S, H]: q_nope [B, n, S, nope], q_rot [B, n, S, rope] (rotated), the normalised latent
    c_kv [B, 1, S, r] and the rotated key k_rot [B, 1, S, rope] that every head shares. q from w_q or the
    low-rank w_q_b(norm(w_q_a x)); [c_kv, k_rot] = w_kv_a x; q and the normalised c_kv times latent_scales
    (LongCat-Flash)."""
    b, s, _ = x.shape
    nope, rope = qk_nope_head_dim, qk_rope_head_dim
    q_scale, kv_scale = latent_scales
    if w_q is not None:
        q = F.linear(x, w_q)
    else:
        q = F.linear(rms_norm(F.linear(x, w_q_a, b_q_a), q_a_norm, norm_eps), w_q_b)
    if q_scale != 1.0:
        q = q * q_scale
    q_nope, q_rot = q.view(b, s, heads, nope + rope).transpose(1, 2).split([nope, rope], dim=-1)
    c_kv, k_rot = F.linear(x, w_kv_a, b_kv_a).split([kv_lora_rank, rope], dim=-1)
    c_kv = rms_norm(c_kv, kv_a_norm, norm_eps)
    if kv_scale != 1.0:
        c_kv = c_kv * kv_scale
    c_kv = c_kv.unsqueeze(1)
    return (q_nope, apply_rope(q_rot, cos, sin, rope_layout), c_kv,
            apply_rope(k_rot.unsqueeze(1), cos, sin, rope_layout))


def mla_expand(c_kv, k_rot, w_kv_b, heads, qk_nope_head_dim, v_head_dim):
    """Per-head k [B, n, L, nope + rope] and v [B, n, L, dv] from the latent c_kv [B, 1, L, r] (w_kv_b: [k_nope, v]
    of every head) and the shared rotary key k_rot [B, 1, L, rope]."""
    b, _, length, _ = c_kv.shape
    kv = F.linear(c_kv.squeeze(1), w_kv_b).view(b, length, heads, qk_nope_head_dim + v_head_dim).transpose(1, 2)
    k_nope, v = kv.split([qk_nope_head_dim, v_head_dim], dim=-1)
    return torch.cat([k_nope, k_rot.expand(-1, heads, -1, -1)], dim=-1), v


def mla_attention(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o, heads,
                  kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rope, norm_eps, scale,
                  latent_scales=(1.0, 1.0)):
    """DeepSeek multi-head latent attention on x [B, S, H] (positions 0..S-1): k and v expanded per head from the
    latent, one rotary key shared by every head."""
    nope, rot = qk_nope_head_dim, qk_rope_head_dim
    cos, sin = rope_cos_sin(x.shape[1], rot, rope, x)
    q_nope, q_rot, c_kv, k_rot = mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos,
                                             sin, heads, kv_lora_rank, nope, rot, rope[1], norm_eps, latent_scales)
    k, v = mla_expand(c_kv, k_rot, w_kv_b, heads, nope, v_head_dim)
    return F.linear(causal_attention(torch.cat([q_nope, q_rot], dim=-1), k, v, scale), w_o, b_o)


# ---------------------------------------------------------------------------------------------------
# the decode form (model_ops.py: cached_attention, cached_mla_attention): S new tokens after a cache of P.


def rope_cos_sin_at(positions, dim, rope, like):
    """cos, sin [B, 1, S, dim/2] of the positions [B, S] of each token (angles as rope_cos_sin computes them)."""
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    freqs = positions.to(compute)[..., None] * rope_inverse_frequencies(dim, rope, compute, like.device)
    cos, sin = rope_angles_cos_sin(freqs, rope, like)
    if rope[6] is not None:  # LongRoPE: the long tables when the call's last position passes the original context
        long_freqs = positions.to(compute)[..., None] * rope_inverse_frequencies(dim, rope, compute, like.device, True)
        long_cos, long_sin = rope_angles_cos_sin(long_freqs, rope, like, True)
        long = positions.max() + 1 > rope[6][2]
        cos, sin = torch.where(long, long_cos, cos), torch.where(long, long_sin, sin)
    return cos[:, None], sin[:, None]


def visible_keys(attention_mask, new_len, window=None, chunk=None, position_ids=None):
    """bool [B, 1, S, L] from attention_mask [B, L] (1 = real token): new token i, in cache slot L-S+i, sees
    slot j when j <= L-S+i and the mask keeps j (with a sliding window W also L-S+i - j < W; with chunks of C
    also when key position cumsum(mask)[j] - 1 and the query's position_ids fall in one chunk); it always sees
    itself, so a padding token's row is never empty (no NaN) and no real token reads a padding slot."""
    total = attention_mask.shape[1]
    slot = torch.arange(new_len, device=attention_mask.device)[:, None] + (total - new_len)
    key = torch.arange(total, device=attention_mask.device)[None, :]
    seen = key <= slot
    if window is not None:
        seen = seen & (slot - key < window)
    seen = attention_mask.bool()[:, None, None, :] & seen
    if chunk is not None:
        key_chunk = torch.div(attention_mask.cumsum(-1) - 1, chunk, rounding_mode="floor")
        query_chunk = torch.div(position_ids, chunk, rounding_mode="floor")
        seen = seen & (key_chunk[:, None, None, :] == query_chunk[:, None, :, None])
    return seen | (key == slot)


def masked_attention(q, k, v, scale, visible):
    """q [B, h, S, d], k [B, hk, L, d], v [B, hk, L, dv], visible bool [B, 1, S, L] -> [B, h, S, dv]; query
    head i reads kv head i // (h / hk). One kv head (MLA's latent cache) is broadcast, not copied."""
    h, hk = q.shape[1], k.shape[1]
    if hk == 1 and h > 1:
        k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    elif h != hk:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def merge_heads(y):
    """[B, h, S, d] -> [B, S, h*d]."""
    b, h, s, d = y.shape
    return y.transpose(1, 2).reshape(b, s, h * d)


def cached_attention(x, position_ids, attention_mask, past_key, past_value, w_q, w_k, w_v, w_o, b_q, b_k, b_v, b_o,
                     q_norm, k_norm, sinks, heads, kv_heads, head_dim, qk_norm, rope, norm_eps, scale, window,
                     clip=None, chunk=None, temperature=None):
    """`attention` on the new tokens x [B, S, H] at position_ids [B, S] after the past K/V [B, kv_heads, P, d]:
    (y [B, S, H], present key, present value [B, kv_heads, P+S, d])."""
    cos, sin = rope_cos_sin_at(position_ids, rope_dim(rope, head_dim), rope, x)
    q, k, v = attention_qkv(x, w_q, w_k, w_v, b_q, b_k, b_v, q_norm, k_norm, cos, sin, heads, kv_heads, head_dim,
                            qk_norm, rope[1], norm_eps, clip)
    q = tuned_queries(q, position_ids, temperature)
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    visible = visible_keys(attention_mask, x.shape[1], window, chunk, position_ids)
    if sinks is not None:
        y = attention_with_sinks(q, k, v, scale, visible, sinks)
    else:
        y = masked_attention(q, k, v, scale, visible)
    return F.linear(merge_heads(y), w_o, b_o), k, v


def cached_mla_attention(x, position_ids, attention_mask, past_key, past_value, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a,
                         kv_a_norm, w_kv_b, w_o, b_q_a, b_kv_a, b_o, heads, kv_lora_rank, qk_nope_head_dim,
                         qk_rope_head_dim, v_head_dim, rope, norm_eps, scale, cache_layout,
                         latent_scales=(1.0, 1.0)):
    """`mla_attention` on the new tokens x [B, S, H] after the past cache: (y, present key slot, present value
    slot). cache_layout "expanded": per-head K [B, n, P+S, nope+rope] and V [B, n, P+S, dv]. "latent": the
    normalised latent c_kv [B, 1, P+S, r] and the rotated shared key [B, 1, P+S, rope]; w_kv_b is absorbed
    (DeepSeek-V2 §2.1.2): the query's nope part is taken into the latent space (q_nope W_UK), attention runs
    over [latent, rotary] dims with the latent as value, and W_UV maps the result back per head, so the cache
    is never expanded to heads."""
    nope, rot, dv, r = qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank
    cos, sin = rope_cos_sin_at(position_ids, rot, rope, x)
    q_nope, q_rot, c_kv, k_rot = mla_latents(x, w_q, w_q_a, q_a_norm, w_q_b, w_kv_a, kv_a_norm, b_q_a, b_kv_a, cos,
                                             sin, heads, r, nope, rot, rope[1], norm_eps, latent_scales)
    visible = visible_keys(attention_mask, x.shape[1])
    if cache_layout == "latent":
        c_kv = torch.cat([past_key.to(c_kv.dtype), c_kv], dim=2)
        k_rot = torch.cat([past_value.to(k_rot.dtype), k_rot], dim=2)
        w = w_kv_b.view(heads, nope + dv, r)
        q_latent = torch.matmul(q_nope, w[:, :nope])                          # [B, n, S, r]
        y_latent = masked_attention(torch.cat([q_latent, q_rot], dim=-1), torch.cat([c_kv, k_rot], dim=-1), c_kv,
                                    scale, visible)                             # [B, n, S, r]
        y = torch.matmul(y_latent, w[:, nope:].transpose(1, 2))               # [B, n, S, dv]
        return F.linear(merge_heads(y), w_o, b_o), c_kv, k_rot
    k, v = mla_expand(c_kv, k_rot, w_kv_b, heads, nope, dv)
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    y = masked_attention(torch.cat([q_nope, q_rot], dim=-1), k, v, scale, visible)
    return F.linear(merge_heads(y), w_o, b_o), k, v


# ---------------------------------------------------------------------------------------------------
# mixture of attention heads (JetMoE; model_ops.py: moa_attention, cached_moa_attention). The router's record
# (expert_idx, weights [T, k]) comes from the graph's routing ops. The experts' query and output projections are
# grouped linear maps (`expert_linear`): at eager inference each expert's chosen rows run as one GEMM, as the expert
# FFNs do; under torch.compile / torch.export and with autograd, every expert's projection runs as one GEMM over the
# stacked weights and the chosen ones are picked, a form with no routing-dependent shape (E/k times the work).
# Query heads are kv-head-major (h*k + j), so query head i reads kv head i // k.


def add_bias(y, bias):
    """y [..., H] + bias [H] (experts.output_bias)."""
    return y + bias.to(y.dtype)


def expert_linear(x, expert_idx, w):
    """y [T, k, out]: slot j of token t is x_tj @ w[expert_idx[t, j]]^T, w [E, out, in]; x [T, in] (every slot reads
    the token) or [T, k, in] (each slot its own row)."""
    t, k = expert_idx.shape
    experts, out, width = w.shape
    rows = x if x.dim() == 2 else x.reshape(t * k, width)
    if torch.compiler.is_compiling() or needs_autograd(x, w):
        if x.dim() == 2:   # every expert on every token, the chosen ones picked
            every = F.linear(x, w.reshape(experts * out, width)).view(t, experts, out)
            return every.gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, out))
        # each slot's row in its expert's place (zeros elsewhere), one batched GEMM per expert
        slots = x.new_zeros(t, experts, width).scatter(1, expert_idx.unsqueeze(-1).expand(-1, -1, width), x)
        every = torch.matmul(slots.transpose(0, 1), w.transpose(1, 2))                 # [E, T, out]
        return every.transpose(0, 1).gather(1, expert_idx.unsqueeze(-1).expand(-1, -1, out))
    order = torch.argsort(expert_idx.reshape(-1), stable=True)
    y = x.new_empty(t * k, out)
    start = 0
    for e, size in enumerate(count_ids(expert_idx.reshape(-1), experts).tolist()):
        if size:
            chosen = order[start:start + size]
            y[chosen] = F.linear(rows.index_select(0, chosen // k if x.dim() == 2 else chosen), w[e])
            start += size
    return y.view(t, k, out)


def moa_queries(x, expert_idx, w_q, kv_heads):
    """q [B, kv_heads*k, S, d] of x [B, S, H] through the query projections of each token's k experts."""
    b, s, hidden = x.shape
    k, width = expert_idx.shape[1], w_q.shape[1]
    q = expert_linear(x.reshape(-1, hidden), expert_idx, w_q)                          # [T, k, kv*d]
    return q.view(b, s, k, kv_heads, -1).permute(0, 3, 2, 1, 4).reshape(b, kv_heads * k, s, width // kv_heads)


def moa_output(y, expert_idx, weights, w_o, b_o, kv_heads):
    """[B, S, H]: y [B, kv_heads*k, S, d] of each chosen expert through its output projection, weighted by the
    routing weights and summed, plus b_o."""
    b, _, s, d = y.shape
    hidden, width = w_o.shape[1], w_o.shape[2]
    k = expert_idx.shape[1]
    chosen = y.view(b, kv_heads, k, s, d).permute(0, 3, 2, 1, 4).reshape(b * s, k, width)
    out = (expert_linear(chosen, expert_idx, w_o) * weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)
    if b_o is not None:
        out = out + b_o
    return out.view(b, s, hidden)


def moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope_layout):
    """q [B, kv_heads*k, S, d], k and v [B, kv_heads, S, d], q and k rotated."""
    b, s, _ = x.shape
    q = moa_queries(x, expert_idx, w_q, kv_heads)
    k = F.linear(x, w_k).view(b, s, kv_heads, head_dim).transpose(1, 2)
    v = F.linear(x, w_v).view(b, s, kv_heads, head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin, rope_layout), apply_rope(k, cos, sin, rope_layout), v


def moa_attention(x, expert_idx, weights, w_q, w_k, w_v, w_o, b_o, kv_heads, head_dim, rope, scale):
    """Mixture of attention heads on x [B, S, H] (positions 0..S-1, causal)."""
    cos, sin = rope_cos_sin(x.shape[1], rope_dim(rope, head_dim), rope, x)
    q, k, v = moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope[1])
    rep = q.shape[1] // kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return moa_output(y, expert_idx, weights, w_o, b_o, kv_heads)


def cached_moa_attention(x, position_ids, attention_mask, past_key, past_value, expert_idx, weights, w_q, w_k, w_v,
                         w_o, b_o, kv_heads, head_dim, rope, scale):
    """`moa_attention` on the new tokens x [B, S, H] at position_ids [B, S] after the past shared K/V
    [B, kv_heads, P, d]: (y [B, S, H], present key, present value [B, kv_heads, P+S, d])."""
    cos, sin = rope_cos_sin_at(position_ids, rope_dim(rope, head_dim), rope, x)
    q, k, v = moa_qkv(x, expert_idx, w_q, w_k, w_v, cos, sin, kv_heads, head_dim, rope[1])
    k = torch.cat([past_key.to(k.dtype), k], dim=2)
    v = torch.cat([past_value.to(v.dtype), v], dim=2)
    y = masked_attention(q, k, v, scale, visible_keys(attention_mask, x.shape[1]))
    return moa_output(y, expert_idx, weights, w_o, b_o, kv_heads), k, v


# ---------------------------------------------------------------------------------------------------
# Block-quantized weights (moe_ir.quantization's layout). A DEQUANTIZE node of the graph runs as
# `packed_weight`: a tuple (qweight, scales, zeros, format, block, int4_packed, int4_scales) that stands for
# the float weight without making it; the FFN and linear kernels below take such a tuple where they take
# a weight and dequantize one expert at a time, or, for decode, run torch's int4 matmul on the codes
# (int4_packed and int4_scales both set) or the fused float32 kernel on the codes regrouped by
# `int4_half_split` (int4_packed set, int4_scales None).


def unpack_int4(packed):
    """uint8 [..., K/2] -> codes uint8 [..., K]: the low nibble is the even column."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_weight(qweight, scales, zeros, fmt, block):
    """The float weight [..., N, K] in the scales' dtype: (code - zero) * scale per block of input columns
    (zero 8 for symmetric int4, 0 for symmetric int8); fp8_e4m3: value * scale per block x block tile. The
    same products as the reference's (code - zero is an exact small integer in float), so the values are
    identical; blocks broadcast against their scale instead of repeating it over the columns."""
    if fmt == "fp8_e4m3":
        n, k = qweight.shape[-2:]
        tiles = scales.repeat_interleave(block, dim=-2)[..., :n, :].repeat_interleave(block, dim=-1)[..., :k]
        return qweight.to(scales.dtype) * tiles
    dtype = scales.dtype
    # One float buffer, filled and then scaled in place: each extra temporary of a weight's size is a pass
    # over fresh memory, which dominated when decode dequantizes an expert per call.
    if fmt == "int4":
        codes = torch.empty(*qweight.shape, 2, dtype=dtype, device=qweight.device)
        codes[..., 0] = qweight & 0xF
        codes[..., 1] = qweight >> 4
    else:
        codes = qweight.to(dtype)
    blocks = codes.view(*scales.shape, block)
    if zeros is not None:
        blocks.sub_(zeros.to(dtype).unsqueeze(-1))
    elif fmt == "int4":
        blocks.sub_(8.0)
    return blocks.mul_(scales.unsqueeze(-1)).view(*qweight.shape[:-1], -1)


def int4_matmul_takes(qweight, fmt, block):
    """Whether torch's CPU int4 matmul (_weight_int4pack_mm_for_cpu) serves this weight: int4 codes, a block
    of 32..256 (its group sizes), on CPU, and torch has the op."""
    return (fmt == "int4" and block in (32, 64, 128, 256) and qweight.device.type == "cpu"
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def int4_matmul_layout(qweight, scales, zeros, block):
    """(packed codes, scales_and_zeros) of each matrix in the layout of torch's CPU int4 matmul, stacked like
    qweight: the op computes (code - 8) * scale + zero per group, so a symmetric block (code stored + 8)
    has zero 0 and one with zero point z has zero (8 - z) * scale; scales_and_zeros is bfloat16
    [K/block, N, 2] (the op's fast path takes bfloat16 activations and scales)."""
    k = qweight.shape[-1] * 2
    codes = unpack_int4(qweight).to(torch.int32).reshape(-1, qweight.shape[-2], k)
    packed = torch.stack([torch.ops.aten._convert_weight_to_int4pack_for_cpu(c.contiguous(), 1) for c in codes])
    s = scales.to(torch.float32).reshape(-1, *scales.shape[-2:])
    z = torch.zeros_like(s) if zeros is None else (8 - zeros.to(torch.float32).reshape(s.shape)) * s
    layout = torch.stack((s, z), dim=-1).transpose(1, 2).contiguous().to(torch.bfloat16)
    return (packed.reshape(*qweight.shape[:-2], *packed.shape[-2:]),
            layout.reshape(*scales.shape[:-2], *layout.shape[-3:]))


def int4_half_split(qweight, block):
    """Stored int4 codes [..., N, K/2] (columns 2j, 2j+1 in one byte) -> [..., N, K/block, block/2]: each block's
    first block/2 columns in the low nibbles, its last block/2 in the high ones, so the fused kernel reads
    both halves of a block with contiguous loads. The same bytes' worth: no float copy."""
    codes = unpack_int4(qweight)
    halves = codes.view(*codes.shape[:-1], codes.shape[-1] // block, 2, block // 2)
    return halves[..., 0, :] | (halves[..., 1, :] << 4)


def int4_fused_matmul(x, codes, scales, zeros):
    """x [M, K] @ W.T for an int4 W held as `int4_half_split` codes [N, K/block, block/2]: each weight is
    dequantized where it is used, (code - zero) * scale in float32 (the reference's value), and multiplied by
    x, so every product is the reference's; only the order of the sum differs. Written for torch.compile,
    which makes it one loop over the codes (half a byte a weight instead of float32's four)."""
    n, blocks, half = codes.shape
    s = scales.unsqueeze(-1)
    zero = 8.0 if zeros is None else zeros.to(s.dtype).unsqueeze(-1)
    low = ((codes & 15).to(s.dtype) - zero) * s
    high = ((codes >> 4).to(s.dtype) - zero) * s
    xv = x.view(x.shape[0], 1, blocks, 2, half)
    return (xv[:, :, :, 0] * low + xv[:, :, :, 1] * high).sum((-1, -2))


def compiled_int4_matmul(x, codes, scales, zeros):
    """int4_fused_matmul compiled once a process by torch.compile (Inductor's C++ kernel), kept on this
    function (a copy of the kernels carries no module state)."""
    compiled = getattr(compiled_int4_matmul, "compiled", None)
    if compiled is None:
        compiled = compiled_int4_matmul.compiled = torch.compile(int4_fused_matmul, fullgraph=True)
    return compiled(x, codes, scales, zeros)


def packed_weight(qweight, scales, zeros, fmt, block, int4_activations):
    """A quantized weight as the kernels take it (see above). `int4_activations` "bf16": int4 weights also
    get the layout of torch's int4 matmul (made here once per weight; the eager module keeps the result
    while the weights are unchanged), which decode then runs with bfloat16 activations: about a quarter of
    float32's bytes read, at bfloat16 precision (~3e-3 relative). "fused": int4 weights also get the
    `int4_half_split` layout, which decode runs through `compiled_int4_matmul` on float32 activations
    (the reference's products). None: every weight is dequantized before a float32 GEMM."""
    if int4_activations == "bf16" and int4_matmul_takes(qweight, fmt, block):
        packed, layout = int4_matmul_layout(qweight, scales, zeros, block)
        return (qweight, scales, zeros, fmt, block, packed, layout)
    if int4_activations == "fused" and fmt == "int4" and block % 2 == 0:
        return (qweight, scales, zeros, fmt, block, int4_half_split(qweight, block), None)
    return (qweight, scales, zeros, fmt, block, None, None)


def is_packed(w):
    return isinstance(w, tuple)


def unpacked(w):
    """A weight as a float tensor: a packed weight dequantized whole (the ops that read weights whole:
    embeddings, attention projections), any other operand as it is."""
    return dequantize_weight(w[0], w[1], w[2], w[3], w[4]) if isinstance(w, tuple) else w


def packed_expert(w, e):
    """Expert e's matrix of a stacked packed weight (views: nothing is copied)."""
    if w is None:
        return None
    qweight, scales, zeros, fmt, block, packed, layout = w
    return (qweight[e], scales[e], None if zeros is None else zeros[e], fmt, block,
            None if packed is None else packed[e], None if layout is None else layout[e])


def packed_linear(x, w, b):
    """x [n, K] @ W.T (+ b) for a packed matrix W: W dequantized (one matrix at a time) and a float GEMM, the
    same products as the reference; for 1-3 rows of a weight packed with int4_activations "bf16", torch's
    int4 matmul on the codes with bfloat16 activations (decode: bound by reading the weight). torch's int4
    matmul on float32 activations is no faster than the float32 GEMV here, and its output is bfloat16."""
    if w[5] is not None and w[6] is not None and x.shape[0] < 4:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), w[5], w[4],
                                                       w[6]).to(x.dtype)
    elif w[5] is not None and x.shape[0] < 4 and x.dtype == w[1].dtype == torch.float32:
        y = compiled_int4_matmul(x.contiguous(), w[5], w[1], w[2])
    else:
        y = F.linear(x, dequantize_weight(w[0], w[1], w[2], w[3], w[4]).to(x.dtype))
    return y if b is None else y + b.to(y.dtype)


def ffn_packed(x, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`ffn` on packed weights."""
    up = packed_linear(x, w_up, b_up)
    gate = packed_linear(x, w_gate, b_gate) if w_gate is not None else None
    return packed_linear(activate(activation, gate, up), w_down, b_down)


def grouped_ffn_packed(x, rows, group_sizes, w_up, w_down, w_gate, b_up, b_down, b_gate, activation):
    """`grouped_ffn` on packed expert weights: each expert with rows runs `ffn_packed` on its own matrices,
    so at most one expert's float weights exist at a time (never a float copy of every expert). Under
    torch.compile the groups are unbacked slices as in `grouped_ffn_traced`."""

    def expert_ffn(e, xe):
        return ffn_packed(xe, packed_expert(w_up, e), packed_expert(w_down, e), packed_expert(w_gate, e),
                          *(None if b is None else b[e] for b in (b_up, b_down, b_gate)), activation)

    if torch.compiler.is_compiling():
        return experts_traced(x, rows, group_sizes, expert_ffn)
    # on the caller's thread: the fused int4 kernel is compiled by torch.compile on first use, which must not
    # run on two threads at once
    return experts_in_place(x, rows, group_sizes.tolist(), expert_ffn, side_by_side=False)
