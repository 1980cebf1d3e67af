"""Throughput of the exported layer: ONNX Runtime (portable, ort flavours) and AOTInductor vs the eager
backend, side by side in one process, plus the ONNX export's time and peak memory.

Default shape: one DeepSeekMoE-16B MoE layer (hidden 2048, 64 routed experts of width 1408, 2 shared,
top-6, softmax, float32) at 1024 tokens. Every backend loads the same seeded weights; the timed calls
are interleaved (round r runs every backend once) and the median per backend is reported, so drift in
machine load hits all backends alike. Export is measured in a child process per flavour: wall time and
the rise of peak RSS over the RSS with the weights already in memory (Linux: /proc/self/clear_refs).

    python tools/bench_onnx.py                       # full shape (needs ~14 GB RAM, a few minutes)
    python tools/bench_onnx.py --experts 16 --tokens 256 --no-aoti   # quick look
"""
from __future__ import annotations

import argparse
import atexit
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TARGETS = {"onnx:portable": 0.8, "onnx:ort": 1.0, "aoti": 1.0}


def make_spec(args):
    from moe_ir.spec import spec_from_dict

    return spec_from_dict({"name": "deepseekmoe16b_layer", "hidden": args.hidden, "dtype": "float32",
                           "source": "DeepSeekMoE 16B (arXiv 2401.06066; deepseek-moe-16b-base config)",
                           "experts": {"routed": args.experts, "width": args.width, "top_k": args.top_k,
                                       "shared": args.shared},
                           "router": {"score": "softmax"}})


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def export_child(args) -> None:
    """In a child process: init weights, then export one flavour; prints a JSON line."""
    from moe_ir.backends.onnx import OnnxBackend
    from moe_ir.builder import build_graph
    from moe_ir.params import init_weights

    spec = make_spec(args)
    graph = build_graph(spec)
    weights = init_weights(graph, 0)
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter, so VmHWM measures the export alone
    except OSError:
        pass
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = OnnxBackend(args.export_child).build(spec, graph, weights, Path(args.out))
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_extra_bytes": (peak - before) * 1024, "weight_bytes": weight_bytes,
                      "files": [str(p) for p in result.files],
                      "file_bytes": sum(p.stat().st_size for p in result.files)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--width", type=int, default=1408)
    p.add_argument("--shared", type=int, default=2)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-aoti", action="store_true", help="skip AOTInductor (its compile takes minutes at full size)")
    p.add_argument("--pairwise", action="store_true",
                   help="hold eager plus one backend at a time (each pair interleaved): ~half the memory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--export-child", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.export_child:
        export_child(args)
        return 0

    from moe_ir.backends import get_backend
    from moe_ir.backends.aoti import compile_package, load_runner as load_aoti
    from moe_ir.backends.onnx import load_runner as load_onnx
    from moe_ir.builder import build_graph
    from moe_ir.params import init_weights
    from moe_ir.passes import run_pipeline

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_eager import cpu_model, machine_limits  # the tools folder is not a package

    read_gbs, gemm_gflops = machine_limits(args.tokens)  # before any weights take the memory
    spec = make_spec(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the export's 2 GiB go with the run
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    exports = {}
    for flavour in ("portable", "ort"):
        log(f"exporting onnx:{flavour} ...")
        cmd = [sys.executable, __file__, "--export-child", flavour, "--out", str(tmp / flavour),
               "--hidden", str(args.hidden), "--experts", str(args.experts), "--width", str(args.width),
               "--shared", str(args.shared), "--top-k", str(args.top_k)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log(proc.stderr[-3000:])
            return 1
        exports[flavour] = json.loads(proc.stdout.strip().splitlines()[-1])

    graph = build_graph(spec)
    weights = init_weights(graph, 0)
    eager = get_backend("torch")
    eager_run = eager.prepare(run_pipeline(build_graph(spec), eager.pipeline), weights)
    setup = {}
    loaders = {f"onnx:{f}": (lambda f=f: load_onnx(exports[f]["files"][0])) for f in ("portable", "ort")}
    if not args.no_aoti:
        log("compiling aoti package ...")
        start = time.perf_counter()
        package = compile_package(graph, weights, tmp / "layer.pt2")
        setup["aoti (compile)"] = time.perf_counter() - start
        loaders["aoti"] = lambda: load_aoti(package)
    del weights  # the eager module holds its own copy

    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(0))
    reference = eager_run(x)["out"]
    errors = {"torch (eager)": 0.0}
    times: dict[str, list[float]] = {"torch (eager)": []}

    eager_in_group: dict[str, list[float]] = {}  # eager times of the rounds each backend ran in

    def timed_rounds(runners):
        log(f"timing {', '.join(runners)} x {args.repeats} interleaved rounds ...")
        start_index = len(times["torch (eager)"])
        for _ in range(args.repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - start)
        for name in runners:
            eager_in_group[name] = times["torch (eager)"][start_index:]

    groups = [[name] for name in loaders] if args.pairwise else [list(loaders)]
    for group in groups:
        runners = {"torch (eager)": eager_run}
        for name in group:
            start = time.perf_counter()
            runners[name] = loaders[name]()
            setup[f"{name} (load)"] = time.perf_counter() - start
            errors[name] = float((runners[name](x)["out"] - reference).abs().max())  # also the warm-up call
            times[name] = []
        timed_rounds(runners)
        del runners
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in times:
        ratio = 1.0 if name == "torch (eager)" else statistics.median(eager_in_group[name]) / median[name]
        target = TARGETS.get(name)
        rows.append({"backend": name, "median_ms": median[name] * 1e3, "tokens_per_s": args.tokens / median[name],
                     "vs_eager": ratio, "target": target, "meets": None if target is None else ratio >= target,
                     "max_abs_vs_eager": errors[name]})
    result = {"shape": {"hidden": args.hidden, "experts": args.experts, "width": args.width, "shared": args.shared,
                        "top_k": args.top_k, "tokens": args.tokens, "dtype": "float32"},
              "cpu": cpu_model(), "read_gb_per_s": read_gbs, "dense_gemm_gflop_per_s": gemm_gflops,
              "threads": torch.get_num_threads(), "repeats": args.repeats, "pairwise": args.pairwise, "rows": rows, "exports": exports,
              "setup_seconds": setup}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"CPU: {cpu_model()}; machine limits: read bandwidth {read_gbs:.1f} GB/s, dense GEMM {gemm_gflops:.0f} "
          f"GFLOP/s (F.linear of the DeepSeekMoE-16B dense FFN's shape, bench_eager.machine_limits)")
    print(f"MoE layer hidden {args.hidden}, {args.experts} routed x width {args.width}, {args.shared} shared, "
          f"top-{args.top_k}, float32, {args.tokens} tokens; {torch.get_num_threads()} threads; "
          f"median of {args.repeats} interleaved rounds" + (" (pairwise with eager)" if args.pairwise else ""))
    print(f"{'backend':16} {'median ms':>10} {'tokens/s':>10} {'vs eager':>9} {'target':>7}  {'max|d| vs eager':>15}")
    for r in rows:
        target = f">={r['target']:.1f}" if r["target"] is not None else "-"
        mark = "" if r["meets"] is None else ("  ok" if r["meets"] else "  BELOW TARGET")
        print(f"{r['backend']:16} {r['median_ms']:10.1f} {r['tokens_per_s']:10.0f} {r['vs_eager']:8.2f}x {target:>7}"
              f"  {r['max_abs_vs_eager']:15.2e}{mark}")
    for flavour, e in exports.items():
        print(f"export onnx:{flavour}: {e['seconds']:.1f} s, peak memory +{e['peak_extra_bytes'] / 2**30:.2f} GiB over "
              f"{e['weight_bytes'] / 2**30:.2f} GiB of weights ({e['peak_extra_bytes'] / e['weight_bytes']:.2f}x; "
              f"target: total < 2x), files {e['file_bytes'] / 2**30:.2f} GiB")
    for name, s in setup.items():
        print(f"setup {name}: {s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
