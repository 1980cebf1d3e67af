"""GPU benchmark of the Triton MoE path (issue 5) on the DeepSeek-V3 layer shape, bf16.

    python tools/bench_triton.py [--quick] [--tokens 1 16 128 8192] [--repeats 20] [--out results.json]

One command measures everything (< 5 min on an H100; --quick: a smaller shape, < 1 min):
  * HBM roofline: a large device-to-device copy (bytes read + written / time), and the nominal H100
    SXM figure (3.35 TB/s) for comparison.
  * dense bf16 GEMM throughput: torch.matmul of [T, H] x [H, 2F] at the compute-bound token count.
  * per token count, the whole layer (router projection, routed experts, shared expert) two ways:
      triton       the `triton` backend's module (route/dispatch/grouped FFN/combine Triton ops)
      grouped_mm   the same layer with torch routing, an argsort dispatch and
                   torch.nn.functional.grouped_mm for the expert GEMMs (torch's grouped GEMM path)
    Memory-bound rows (few tokens) report achieved GB/s = bytes of weights touched / time, where bytes
    = unique routed experts actually chosen x 3 x H x F x 2 + shared expert + router weight, and the
    % of the measured and of the nominal roofline. Compute-bound rows report TFLOP/s (2 x tokens x k x 3
    x H x F + shared + router) and % of the dense GEMM measured in the same run.
Timing: CUDA events around each call, warmup first, median of --repeats. Results: a table on stdout,
and --out (JSON; a Markdown table next to it with .md).

Issue 5's targets: >= 60% of the HBM roofline at 1/16/128 tokens, >= 50% of dense bf16 GEMM at 8192,
and >= 1.0x grouped_mm on every row. The table prints each check.

Without CUDA: exits with code 2 and one line saying a GPU is needed. The project must be importable
(`python3 -m pip install --no-deps --no-build-isolation -e .` on a fresh machine).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

NOMINAL_HBM_TBPS = 3.35  # H100 SXM5 HBM3, NVIDIA datasheet
MEMORY_BOUND_MAX_TOKENS = 128


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller layer (H 2048, 64 experts of 1024) for a smoke run")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 1 16 128 8192)")
    p.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time the triton module under torch.compile")
    p.add_argument("--out", type=Path, default=Path("bench_triton.json"), help="JSON results (and .md beside it)")
    return p.parse_args(argv)


def _shape(quick: bool) -> dict:
    if quick:
        return dict(name="quick (DeepSeek-V3 routing, smaller layer)", hidden=2048, routed=64, width=1024, shared=1,
                    top_k=8, groups=8, kept=4)
    return dict(name="DeepSeek-V3 layer", hidden=7168, routed=256, width=2048, shared=1, top_k=8, groups=8, kept=4)


def _spec(shape: dict):
    from moe_ir.spec import spec_from_dict

    return spec_from_dict({
        "name": "bench-v3", "hidden": shape["hidden"], "dtype": "bfloat16",
        "experts": {"routed": shape["routed"], "width": shape["width"], "top_k": shape["top_k"],
                    "shared": shape["shared"], "activation": "swiglu"},
        "router": {"score": "sigmoid", "normalize": True, "scaling": 2.5,
                   "group_limit": {"groups": shape["groups"], "kept": shape["kept"], "score": "top2_sum"}},
        "balance": {"aux_free": {"gamma": 0.001}},
    })


def _time_ms(fn, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU (wall clock on a CPU, for the smoke test only)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type != "cuda":
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _weights(graph, device):
    """Seeded random weights at a realistic scale (init_weights would allocate 22 GB on the host first)."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for name, value in graph.weights.items():
        shape, dtype = value.type.shape, value.type.dtype.torch
        if name == "router.bias":
            out[name] = (torch.rand(shape, generator=gen, device=device) * 0.01).to(dtype)
            continue
        fan_in = shape[-1]
        t = torch.empty(shape, dtype=dtype, device=device)
        t.normal_(0.0, fan_in ** -0.5, generator=gen)
        out[name] = t
    return out


# ------------------------------------------------------------------------------- torch grouped_mm path
class GroupedMMLayer:
    """The same layer with torch routing + argsort dispatch + torch.nn.functional.grouped_mm."""

    def __init__(self, w: dict, shape: dict):
        from moe_ir.backends.triton.reference import route_reference

        self.route = route_reference
        # torch.nn.functional.grouped_mm is the public name (torch >= 2.10); torch._grouped_mm before that.
        self.grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
        self.shape = shape
        self.w_router = w["router.weight"]
        self.bias = w["router.bias"]
        # grouped_mm takes mat_b [G, K, N]; a transposed view of the [E, F, H] weights is the column-major
        # operand the Hopper kernel wants (no copy).
        self.w_gate_t = w["experts.w_gate"].transpose(1, 2)
        self.w_up_t = w["experts.w_up"].transpose(1, 2)
        self.w_down_t = w["experts.w_down"].transpose(1, 2)
        self.shared = [(w[f"shared.{i}.w_gate"], w[f"shared.{i}.w_up"], w[f"shared.{i}.w_down"])
                       for i in range(shape["shared"])]

    def __call__(self, x):
        s = self.shape
        logits = torch.nn.functional.linear(x.float(), self.w_router.float())
        weights, expert_idx = self.route(logits, self.bias, score="sigmoid", k=s["top_k"], n_group=s["groups"],
                                         topk_group=s["kept"], group_score="top2_sum", normalize=True, scale=2.5)
        flat = expert_idx.reshape(-1)
        order = flat.argsort(stable=True)
        rows = x[order // s["top_k"]]
        offs = torch.bincount(flat, minlength=s["routed"]).cumsum(0).to(torch.int32)
        gate = self.grouped_mm(rows, self.w_gate_t, offs=offs)
        up = self.grouped_mm(rows, self.w_up_t, offs=offs)
        y = self.grouped_mm(torch.nn.functional.silu(gate) * up, self.w_down_t, offs=offs)
        y = y.float() * weights.reshape(-1)[order, None]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, order // s["top_k"], y)
        out = out.to(x.dtype)
        for w_gate, w_up, w_down in self.shared:
            h = torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)
            out = out + h @ w_down.T
        return out, expert_idx


# ---------------------------------------------------------------------------------------------- main
def run_benchmark(shape: dict, token_counts: list[int], *, device: torch.device, repeats: int = 20, warmup: int = 5,
                  compile: bool = False, copy_bytes: int = 2 * 1024**3) -> dict:
    """Every measurement of the module docstring; returns the results as a dict (see ``main``)."""
    from moe_ir.backends.triton.backend import TritonBackend, TritonMoELayer
    from moe_ir.builder import build_graph
    from moe_ir.passes import run_pipeline

    hidden, routed, width, k = shape["hidden"], shape["routed"], shape["width"], shape["top_k"]
    bf16 = 2
    started = time.perf_counter()

    # ---- roofline references measured in this run
    copy_src = torch.empty(copy_bytes // bf16, dtype=torch.bfloat16, device=device)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = _time_ms(lambda: copy_dst.copy_(copy_src), device, warmup=3, repeats=repeats)
    hbm_gbps = 2 * copy_src.numel() * bf16 / (copy_ms * 1e-3) / 1e9
    del copy_src, copy_dst
    dense_tokens = max(token_counts)
    a = torch.randn(dense_tokens, hidden, dtype=torch.bfloat16, device=device)
    b = torch.randn(hidden, 2 * width, dtype=torch.bfloat16, device=device)
    dense_ms = _time_ms(lambda: torch.matmul(a, b), device, warmup=warmup, repeats=repeats)
    dense_tflops = 2 * dense_tokens * hidden * 2 * width / (dense_ms * 1e-3) / 1e12
    del a, b

    # ---- the layer
    spec = _spec(shape)
    backend = TritonBackend()
    graph = run_pipeline(build_graph(spec), backend.pipeline)
    ok, reason = backend.supports(graph)
    if not ok:
        raise RuntimeError(f"the triton backend cannot run the benchmark layer: {reason}")
    module = TritonMoELayer(graph, _weights(graph, device), device=device).eval()
    weights = module.canonical_weights()  # the module's copies: one set of (22 GB of) expert weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    compiled = torch.compile(module, fullgraph=True, dynamic=True) if compile else None
    torch_path = GroupedMMLayer(weights, shape)
    router_bytes = weights["router.weight"].numel() * weights["router.weight"].element_size()
    shared_bytes = sum(weights[f"shared.{i}.{n}"].numel() * bf16 for i in range(shape["shared"])
                       for n in ("w_gate", "w_up", "w_down"))
    shared_width = width  # spec shared_width defaults to the routed width
    expert_bytes = 3 * hidden * width * bf16

    rows = []
    gen = torch.Generator(device=device).manual_seed(1)
    for tokens in token_counts:
        x = torch.randn(1, tokens, hidden, generator=gen, device=device, dtype=torch.bfloat16)
        x2 = x.reshape(tokens, hidden)
        with torch.no_grad():
            res = module(x)
            unique = int(torch.unique(res["expert_idx"]).numel())
            ref_out, ref_idx = torch_path(x2)
            agree = float((res["expert_idx"].sort(-1).values == ref_idx.sort(-1).values).all(-1).float().mean())
            err = float((res["out"].reshape(tokens, hidden).float() - ref_out.float()).abs().max())
            scale = float(ref_out.float().abs().max())
            triton_ms = _time_ms(lambda: module(x), device, warmup=warmup, repeats=repeats)
            grouped_ms = _time_ms(lambda: torch_path(x2), device, warmup=warmup, repeats=repeats)
            compiled_ms = (_time_ms(lambda: compiled(x), device, warmup=warmup, repeats=repeats)
                           if compiled is not None else None)
        touched = unique * expert_bytes + shared_bytes + router_bytes
        flops = 2 * tokens * (k * 3 * hidden * width + 3 * hidden * shared_width * shape["shared"] + hidden * routed)
        row = {"tokens": tokens, "unique_experts": unique, "bytes_touched": touched, "flops": flops,
               "triton_ms": triton_ms, "grouped_mm_ms": grouped_ms, "compiled_ms": compiled_ms,
               "speedup_vs_grouped_mm": grouped_ms / triton_ms,
               "routing_agreement": agree, "max_abs_diff_vs_grouped_mm": err, "output_scale": scale}
        row["triton_gbps"] = touched / (triton_ms * 1e-3) / 1e9
        row["grouped_mm_gbps"] = touched / (grouped_ms * 1e-3) / 1e9
        row["triton_tflops"] = flops / (triton_ms * 1e-3) / 1e12
        row["grouped_mm_tflops"] = flops / (grouped_ms * 1e-3) / 1e12
        if tokens <= MEMORY_BOUND_MAX_TOKENS:
            row["regime"] = "memory"
            row["pct_measured_roofline"] = 100 * row["triton_gbps"] / hbm_gbps
            row["pct_nominal_roofline"] = 100 * row["triton_gbps"] / (NOMINAL_HBM_TBPS * 1000)
            row["target_met"] = row["pct_measured_roofline"] >= 60 and row["speedup_vs_grouped_mm"] >= 1.0
        else:
            row["regime"] = "compute"
            row["pct_dense_gemm"] = 100 * row["triton_tflops"] / dense_tflops
            row["target_met"] = row["pct_dense_gemm"] >= 50 and row["speedup_vs_grouped_mm"] >= 1.0
        rows.append(row)
        print(f"  {tokens:>5} tokens: triton {triton_ms:.3f} ms, grouped_mm {grouped_ms:.3f} ms", file=sys.stderr)
        del x, x2, res, ref_out

    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "path": module.path, "torch": torch.__version__, "triton": __import__("triton").__version__,
        "shape": shape, "dtype": "bfloat16", "repeats": repeats, "warmup": warmup,
        "hbm_copy_gbps": hbm_gbps, "nominal_hbm_gbps": NOMINAL_HBM_TBPS * 1000,
        "dense_gemm": {"m": dense_tokens, "k": hidden, "n": 2 * width, "ms": dense_ms, "tflops": dense_tflops},
        "rows": rows, "seconds": time.perf_counter() - started,
    }


def main(argv=None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("bench_triton: needs a CUDA GPU (torch sees none); the Triton timings mean nothing in the interpreter",
              file=sys.stderr)
        return 2
    try:
        from moe_ir.params import atomic_write
    except ImportError as err:
        print(f"bench_triton: cannot import the project ({err}); run "
              f"`python3 -m pip install --no-deps --no-build-isolation -e .` in the repo first", file=sys.stderr)
        return 1
    result = run_benchmark(_shape(args.quick), args.tokens or [1, 16, 128, 8192], device=torch.device("cuda"),
                           repeats=args.repeats, warmup=args.warmup, compile=args.compile)
    table = _table(result)
    print(table)
    text = json.dumps(result, indent=2)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    atomic_write(args.out.with_suffix(".md"), lambda tmp: Path(tmp).write_text(table + "\n"))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    return 0


def _table(r: dict) -> str:
    lines = [f"## bench_triton: {r['shape']['name']}, bf16, {r['device']}",
             "",
             f"HBM copy {r['hbm_copy_gbps']:.0f} GB/s measured (nominal {r['nominal_hbm_gbps']:.0f}); "
             f"dense bf16 GEMM {r['dense_gemm']['m']}x{r['dense_gemm']['k']}x{r['dense_gemm']['n']}: "
             f"{r['dense_gemm']['tflops']:.0f} TFLOP/s",
             "",
             "| tokens | experts hit | triton ms | grouped_mm ms | x vs grouped_mm | triton GB/s | % roofline "
             "(meas/nom) | triton TFLOP/s | % dense GEMM | target |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--|"]
    for row in r["rows"]:
        roof = (f"{row['pct_measured_roofline']:.0f}/{row['pct_nominal_roofline']:.0f}"
                if row["regime"] == "memory" else "-")
        dense = f"{row['pct_dense_gemm']:.0f}" if row["regime"] == "compute" else "-"
        lines.append(f"| {row['tokens']} | {row['unique_experts']} | {row['triton_ms']:.3f} | "
                     f"{row['grouped_mm_ms']:.3f} | {row['speedup_vs_grouped_mm']:.2f} | {row['triton_gbps']:.0f} | "
                     f"{roof} | {row['triton_tflops']:.1f} | {dense} | {'met' if row['target_met'] else 'MISSED'} |")
    if any(row["compiled_ms"] is not None for row in r["rows"]):
        lines.append("")
        lines.append("torch.compile(fullgraph, dynamic) of the triton module: " + ", ".join(
            f"{row['tokens']} tok {row['compiled_ms']:.3f} ms" for row in r["rows"]))
    lines.append("")
    lines.append("routing agreement with torch routing: " + ", ".join(
        f"{row['tokens']} tok {100 * row['routing_agreement']:.1f}% (max |diff| {row['max_abs_diff_vs_grouped_mm']:.3g}"
        f" of {row['output_scale']:.3g})" for row in r["rows"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
