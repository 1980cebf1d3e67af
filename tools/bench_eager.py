"""Eager-backend throughput on the DeepSeekMoE-16B layer shape, against transformers' DeepseekV2Moe.

Shape: hidden 2048, 64 routed experts of width 1408, 2 shared, top-6, softmax, float32, 1024 tokens.
Compared in one run, interleaved (each repeat times every contender once, in a fresh order each repeat; a
contender whose call takes a few milliseconds is timed over back-to-back calls of ~0.2 s, per call), median of
repeats (and the best repeat, the figure least disturbed by other work on a shared machine):
  - moe-ir eager module (forward, and forward+backward of out.sum())
  - transformers DeepseekV2Moe, experts implementation "eager" (loop over hit experts, index_add) and
    "grouped_mm" (torch grouped GEMM), selected through config._experts_implementation, same weights
  - a dense SwiGLU FFN doing the same FLOPs (width (top_k + shared) * 1408 on every token): the
    practical GEMM ceiling on a CPU
  - with --onnx: the layer's onnx:portable export (the same weights) in ONNX Runtime, through moe-ir's runner
    (threads that sleep after a call) and in a session with ONNX Runtime's defaults (threads that spin-wait),
    so that the eager forward's fraction of the dense FFN stands beside the ONNX export's, in the same run;
    the spinning session's calls are followed by a pause, so that no call starts while its threads spin
  - with --compile: the `compile` backend (torch.compile, inductor, one graph, dynamic token count, frozen
    weights, expert GEMMs through oneDNN), with its compile time and the resident memory its constants add

The machine's own limits come first: its CPU model, the read bandwidth of one pass over a 1 GiB tensor and
the rate of one dense GEMM of the dense FFN's shape. The summary puts the eager forward against them: its
expert GEMM rate against the dense GEMM rate (the point at many tokens) and the expert weights it reads
per second against the read bandwidth (the point at a few tokens, where reading the weights is the work).

Peak memory is the peak of live torch CPU allocations made during one call (tracked per storage with a
TorchDispatchMode; weights and the input, allocated before the call, are not counted). For the compiled
module, whose kernels allocate outside the dispatcher, it is the resident memory its compilation adds; for
ONNX Runtime, which allocates in its own arena, it is not given.

    python tools/bench_eager.py [--tokens 1024] [--repeats 5] [--threads 2] [--onnx] [--compile] [--no-backward]
"""
from __future__ import annotations

import argparse
import atexit
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moe_ir.backends.torch_eager import MoELayer
from moe_ir.builder import build_graph
from moe_ir.spec import spec_from_dict

HIDDEN, ROUTED, WIDTH, SHARED, TOP_K = 2048, 64, 1408, 2, 6
ORT_RUNNER = "onnx:portable (ONNX Runtime)"
ORT_DEFAULTS = "onnx:portable (ORT defaults)"
SPIN_SETTLE = 0.1  # seconds: ONNX Runtime's threads spin ~50 ms after a call (measured: process CPU time)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created by ops while active (views share their base's storage)."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}
        # Storages that exist before the call (weights, input): views of them (w_up[e]) allocate nothing.
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # strided tensors only: a sparse one (the un-permute's CSR matrix) has no storage of its own
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.layout == torch.strided:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in self.existing:
                    continue
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.refs[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def resident_gib() -> float:
    """This process's resident set now (Linux /proc), in GiB: what compile-time constants add shows here."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_mib(fn, existing=()) -> float:
    tracker = LiveBytes(existing)
    with tracker:
        fn()
    return tracker.peak / 2**20


def cpu_model() -> str:
    """The CPU's model name and its vector extensions that matter to a float32 GEMM (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = [name for name, flag in (("AVX-512", "avx512f"), ("AVX2", "avx2"), ("AMX", "amx_tile")) if flag in flags]
    return f"{fields.get('model name', 'unknown CPU')} ({', '.join(isa) or 'no AVX2'}), {os.cpu_count()} CPUs"


def best_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine_limits(tokens: int) -> tuple[float, float]:
    """(read bandwidth GB/s of one pass over a 1 GiB tensor, GFLOP/s of one dense GEMM [T, H] x [H, W])
    with T = max(tokens, 1024) and W the dense FFN's width: the two ceilings an FFN meets, measured here."""
    big = torch.ones(2**28)  # 1 GiB of float32
    read_gbs = big.numel() * 4 / best_seconds(big.sum) / 1e9
    del big
    rows, width = max(tokens, 1024), (TOP_K + SHARED) * WIDTH
    a, b = torch.randn(rows, HIDDEN), torch.randn(width, HIDDEN)
    gemm_gflops = 2 * rows * HIDDEN * width / best_seconds(lambda: F.linear(a, b), 3) / 1e9
    return read_gbs, gemm_gflops


def make_spec():
    return spec_from_dict({"name": "deepseek-moe-16b", "hidden": HIDDEN,
                           "experts": {"routed": ROUTED, "width": WIDTH, "top_k": TOP_K, "shared": SHARED},
                           "router": {"score": "softmax"}})


def make_hf(module: MoELayer):
    """transformers' DeepseekV2Moe with the module's weights (gate and up concatenated as HF stores them)."""
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    config = DeepseekV2Config(hidden_size=HIDDEN, moe_intermediate_size=WIDTH, n_routed_experts=ROUTED,
                              n_shared_experts=SHARED, num_experts_per_tok=TOP_K, topk_method="greedy",
                              routed_scaling_factor=1.0, norm_topk_prob=False, hidden_act="silu",
                              num_hidden_layers=1, vocab_size=128)
    config._experts_implementation = "eager"
    hf = DeepseekV2Moe(config)
    w = {k: v.detach() for k, v in module.canonical_weights().items()}
    with torch.no_grad():
        hf.gate.weight.copy_(w["router.weight"])
        hf.experts.gate_up_proj.copy_(torch.cat([w["experts.w_gate"], w["experts.w_up"]], dim=1))
        hf.experts.down_proj.copy_(w["experts.w_down"])
        shared = [f"shared.{i}" for i in range(SHARED)]
        hf.shared_experts.gate_proj.weight.copy_(torch.cat([w[f"{s}.w_gate"] for s in shared]))
        hf.shared_experts.up_proj.weight.copy_(torch.cat([w[f"{s}.w_up"] for s in shared]))
        hf.shared_experts.down_proj.weight.copy_(torch.cat([w[f"{s}.w_down"] for s in shared], dim=1))
    return hf, config


def make_dense(seed: int = 0):
    """SwiGLU FFN of width (top_k + shared) * WIDTH: the same GEMM FLOPs per token as the MoE layer's experts."""
    width = (TOP_K + SHARED) * WIDTH
    gen = torch.Generator().manual_seed(seed)
    w_gate = torch.randn(width, HIDDEN, generator=gen) * HIDDEN ** -0.5
    w_up = torch.randn(width, HIDDEN, generator=gen) * HIDDEN ** -0.5
    w_down = torch.randn(HIDDEN, width, generator=gen) * width ** -0.5

    def dense(x):
        t = x.reshape(-1, HIDDEN)
        return F.linear(F.silu(F.linear(t, w_gate)) * F.linear(t, w_up), w_down)

    return dense


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--onnx", action="store_true",
                        help="also time the onnx:portable export of the layer in ONNX Runtime (+2.1 GiB of weights)")
    parser.add_argument("--compile", action="store_true", help="also time the compile backend")
    parser.add_argument("--no-backward", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    spec = make_spec()
    t0 = time.perf_counter()
    module = MoELayer(build_graph(spec), seed=0).eval()
    hf, hf_config = make_hf(module)
    dense = make_dense()
    print(f"CPU: {cpu_model()}")
    print(f"setup {time.perf_counter() - t0:.1f}s; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.tokens} tokens, hidden {HIDDEN}, {ROUTED} routed x {WIDTH} top-{TOP_K} + {SHARED} shared, float32",
          flush=True)
    read_gbs, gemm_gflops = machine_limits(args.tokens)
    print(f"machine limits: read bandwidth {read_gbs:.1f} GB/s (sum of 1 GiB); dense GEMM {gemm_gflops:.0f} GFLOP/s "
          f"(F.linear [{max(args.tokens, 1024)}, {HIDDEN}] x [{HIDDEN}, {(TOP_K + SHARED) * WIDTH}])", flush=True)
    x = torch.randn(1, args.tokens, HIDDEN, generator=torch.Generator().manual_seed(1)) * 0.5

    def hf_forward(impl):
        def run():
            hf_config._experts_implementation = impl
            return hf(x)
        return run

    fwd = {
        "moe-ir eager": lambda: module(x).out,
        "HF DeepseekV2Moe eager": hf_forward("eager"),
        "HF DeepseekV2Moe grouped_mm": hf_forward("grouped_mm"),
        "dense SwiGLU, same FLOPs": lambda: dense(x),
    }
    # Same numbers before timing anything (the two implementations and the oracle agree).
    with torch.no_grad():
        first = module(x)
        ours = first.out
        experts_hit = first.routing["expert_idx"].unique().numel()  # whose weights every forward reads
        for impl in ("eager", "grouped_mm"):
            diff = (hf_forward(impl)() - ours).abs().max().item()
            print(f"max |moe-ir - HF {impl}| = {diff:.2e} (output max {ours.abs().max().item():.2e})")

    if args.onnx:
        from moe_ir.backends.onnx import OnnxBackend, load_runner

        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="bench-eager-onnx-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the export's 2 GiB go with the run
        built = OnnxBackend("portable").build(spec, build_graph(spec), module.canonical_weights(), folder)
        # moe-ir's runner: torch's thread count, threads that do not spin after a call (ONNX Runtime's default
        # spinning would take the cores of whichever contender runs next)
        onnx_runner = load_runner(built.files[0], threads=torch.get_num_threads())
        diff = (onnx_runner(x)["out"] - ours).abs().max().item()
        print(f"onnx:portable export and session: {time.perf_counter() - start:.1f}s; max |moe-ir - onnx:portable| = "
              f"{diff:.2e}", flush=True)
        fwd[ORT_RUNNER] = lambda: onnx_runner(x)["out"]
        # The same file in a session with ONNX Runtime's defaults but the thread count (torch's, as the runner's),
        # whose threads spin-wait after a call: the figure a user of ONNX Runtime alone gets. Its calls are
        # followed by a pause, so that threads still spinning take no core from the next contender.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        spinning = ort.InferenceSession(str(built.files[0]), options, providers=["CPUExecutionProvider"])
        feed_name = spinning.get_inputs()[0].name
        fwd[ORT_DEFAULTS] = lambda: spinning.run(None, {feed_name: x.numpy()})[0]

    compile_seconds = None
    if args.compile:
        from moe_ir.backends.compile import CompiledRunner

        # The runner takes its module over (it swaps the expert FFN kernel), so it gets a module of its own.
        runner = CompiledRunner(MoELayer(module.graph, module.canonical_weights()))
        rss_before = resident_gib()
        runner(x)
        compile_seconds = runner.compile_seconds
        print(f"torch.compile (inductor, fullgraph, dynamic, frozen weights): first call {compile_seconds:.1f}s; "
              f"resident memory +{resident_gib() - rss_before:.2f} GiB after compiling "
              f"(weights {sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30:.2f} GiB)",
              flush=True)
        fwd["moe-ir compile"] = lambda: runner(x)["out"]

    bwd = {}
    if not args.no_backward:
        x_grad = x.clone().requires_grad_(True)

        def ours_train():
            module.zero_grad(set_to_none=True)
            module(x_grad).out.sum().backward()

        def hf_train():
            hf.zero_grad(set_to_none=True)
            hf_config._experts_implementation = "eager"
            hf(x_grad).sum().backward()

        bwd = {"moe-ir eager fwd+bwd": ours_train, "HF eager fwd+bwd": hf_train}

    times: dict[str, list[float]] = {name: [] for name in [*fwd, *bwd]}
    memory: dict[str, float] = {}
    existing = [x, *module.parameters(), *module.buffers(), *hf.parameters()]

    def warm_up(name, fn):
        start = time.perf_counter()
        fn()
        # Compiled code allocates outside the dispatcher's view (and a dispatch mode makes dynamo skip the
        # frame), so its memory is the resident growth printed after compiling, not a per-call peak; ONNX
        # Runtime allocates in its own arena, which torch does not see either.
        untracked = name == "moe-ir compile" or name.startswith("onnx:")
        memory[name] = None if untracked else peak_mib(fn, existing)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f}s (incl. memory pass), peak "
              f"{'n/a' if memory[name] is None else f'{memory[name]:.0f} MiB'}", file=sys.stderr, flush=True)

    with torch.no_grad():
        for name, fn in fwd.items():
            warm_up(name, fn)
    for name, fn in bwd.items():
        warm_up(name, fn)
    # Calls of a few milliseconds (a few tokens) are timed in runs of back-to-back calls of ~0.2 s, per call,
    # so that a thread's wake-up or one preemption is not the figure.
    calls = {}
    with torch.no_grad():
        for name, fn in fwd.items():
            start = time.perf_counter()
            fn()
            calls[name] = max(1, min(50, round(0.2 / (time.perf_counter() - start))))
    order = random.Random(0)
    for rep in range(args.repeats):
        # a fresh order each round, so that each contender follows every other one (what one call leaves
        # behind, in caches or in threads that spin on, lands on whichever call comes next)
        names = list(fwd)
        order.shuffle(names)
        for name in names:
            with torch.no_grad():
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fwd[name]()
                times[name].append((time.perf_counter() - start) / calls[name])
            if name == ORT_DEFAULTS:
                time.sleep(SPIN_SETTLE)  # its threads spin on after the call: not into the next contender's time
        for name, fn in bwd.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {t[-1] * 1e3:.0f}ms" for n, t in times.items()),
              file=sys.stderr, flush=True)

    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    ours_f = med["moe-ir eager"]
    print()
    print(f"| {'implementation':<30} | {'median ms':>9} | {'best ms':>9} | {'tokens/s':>9} | "
          f"{'moe-ir eager speed-up':>21} | {'peak alloc MiB':>14} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 23}|{'-' * 16}|")
    for name, t in med.items():
        ref = med["moe-ir eager fwd+bwd"] if "fwd+bwd" in name else ours_f
        print(f"| {name:<30} | {t * 1e3:>9.1f} | {best[name] * 1e3:>9.1f} | {args.tokens / t:>9.0f} | "
              f"{t / ref:>20.2f}x | {'n/a' if memory[name] is None else f'{memory[name]:.0f}':>14} |")
    print()
    print("ratios: contender time / moe-ir eager time (above 1: moe-ir eager is faster), median and best repeat")
    targets = [
        ("fwd vs HF eager", med["HF DeepseekV2Moe eager"] / ours_f, 1.5),
        ("fwd vs HF grouped_mm", med["HF DeepseekV2Moe grouped_mm"] / ours_f, 1.0),
    ]
    dense_ratio = med["dense SwiGLU, same FLOPs"] / ours_f
    best_ratios = {"fwd vs HF eager": best["HF DeepseekV2Moe eager"] / best["moe-ir eager"],
                   "fwd vs HF grouped_mm": best["HF DeepseekV2Moe grouped_mm"] / best["moe-ir eager"]}
    if bwd:
        targets.append(("fwd+bwd vs HF eager", med["HF eager fwd+bwd"] / med["moe-ir eager fwd+bwd"], 1.5))
    if args.compile:
        targets.append(("compile vs eager fwd", ours_f / med["moe-ir compile"], 1.2))
    for label, ratio, target in targets:
        best_text = f", best {best_ratios[label]:.2f}x" if label in best_ratios else ""
        print(f"{label:<34} {ratio:5.2f}x{best_text}  (target >= {target}x: {'met' if ratio >= target else 'NOT met'})")
    # The dense FFN of equal FLOPs is the practical ceiling: each implementation's fraction of it, the eager
    # forward's set against the ONNX export's, both from this run.
    best_dense = best["dense SwiGLU, same FLOPs"]
    print(f"{'eager fwd / dense SwiGLU time':<34} {dense_ratio:5.2f}x, best {best_dense / best['moe-ir eager']:.2f}x")
    if args.onnx:
        for onnx_name, label in ((ORT_RUNNER, "onnx:portable / dense SwiGLU time"),
                                 (ORT_DEFAULTS, "  same, ORT defaults (spinning)")):
            onnx_ratio = med["dense SwiGLU, same FLOPs"] / med[onnx_name]
            # judged by median: the best repeat of either is one lucky call on a shared machine
            print(f"{label:<34} {onnx_ratio:5.2f}x, best {best_dense / best[onnx_name]:.2f}x  "
                  f"(eager at least the ONNX export's fraction: {'met' if dense_ratio >= onnx_ratio else 'NOT met'})")
    if compile_seconds is not None:
        print(f"compile time (first call): {compile_seconds:.1f}s")
    gflop = 2 * 3 * HIDDEN * WIDTH * (TOP_K + SHARED) * args.tokens / 1e9
    print(f"expert GEMM work {gflop:.1f} GFLOP per forward: moe-ir eager runs at {gflop / ours_f:.0f} GFLOP/s "
          f"({gflop / ours_f / gemm_gflops:.2f} of the dense GEMM rate)")
    # Expert weights read per forward: every routed expert some token of this input picks, and the shared ones.
    experts_read = experts_hit + SHARED
    weight_gb = experts_read * 3 * HIDDEN * WIDTH * 4 / 1e9
    print(f"expert weights read per forward: {weight_gb:.2f} GB at least ({experts_read - SHARED} of {ROUTED} routed "
          f"experts hit), {weight_gb / ours_f:.1f} GB/s "
          f"({weight_gb / ours_f / read_gbs:.2f} of the read bandwidth)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
