"""Quantized experts on the CPU: the DeepSeekMoE-16B layer shape (hidden 2048, 64 routed experts of width 1408,
2 shared, top-6, softmax) at 1 and 16 tokens (and --long 1024), float32 against int8 and int4 weights on the
eager backend, in one run, interleaved (each repeat times every contender once, in turn); median and best of
the repeats.

Contenders (one set of float weights, quantized round-to-nearest with block 32 along the input dimension):
  float32         the float layer (the reference point)
  int8 / int4     exact: every product equals the quantized reference's in float32; each expert hit is
                  dequantized on its own (never a float copy of all experts), then a float GEMM
  int4 fused      exact as int4, with 1-3 rows per expert through the compiled fused kernel (the backend's
                  int4_activations="fused": torch.compile'd dequantize-in-registers matmul on float32
                  activations, half a byte of codes read per weight); more rows dequantize
  int4 bf16-act   int4 decode through torch's CPU int4 matmul on bfloat16 activations (the backend's
                  int4_activations="bf16"; 1-3 rows per expert), ~3e-3 relative error; more rows dequantize
  ort float32     the onnx:ort export of the float layer (routed experts as com.microsoft.MoE) in onnxruntime
  ort int8/int4 QMoE  the onnx:ort export (routed experts as com.microsoft.QMoE, the shared experts as
                  com.microsoft.MatMulNBits) in onnxruntime, same threads, exact (int8: float activations,
                  ORT_QMOE_CPU_QNBIT_GEMM=fp32 as moe-ir's runner sets it) (--no-ort leaves these out)
  ort int8/int4 QMoE int8-act  the same exports with int8 activations (`--int4-activations int8`: QMoE and
                  MatMulNBits at accuracy_level 4), not exact
Times are wall clock; `cpu ms` is the process's CPU time per call (all threads), steadier than wall clock on a
machine other processes share. The header gives the CPU model and the copy bandwidth of this run (a 512 MiB clone: bytes read + written per
second). Each row gives the weight bytes a call touches (the router, the shared experts and each routed
expert hit at least once, in the format's storage: codes + scales (+ zero points)), and those bytes over the
time against the copy bandwidth: near 1 means the path is bound by reading weights, far below means
dequantization or the kernel's arithmetic dominates.

    python tools/bench_quant.py [--tokens 1 16] [--long] [--repeats 7] [--threads 2] [--block 32] [--no-ort]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_ir.backends import get_backend
from moe_ir.builder import build_graph
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.quantization import quantize_weights
from moe_ir.spec import spec_from_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager import cpu_model  # noqa: E402 - the tools folder is not a package

HIDDEN, ROUTED, WIDTH, SHARED, TOP_K = 2048, 64, 1408, 2, 6


def copy_bandwidth(repeats: int = 5) -> float:
    """Bytes read + written per second by a clone of a 512 MiB tensor (best of `repeats`)."""
    src = torch.ones(128 * 2**20, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst = src.clone()
        best = min(best, time.perf_counter() - t)
        del dst
    return 2 * src.numel() * 4 / best


def layer_spec(quantization: dict | None) -> dict:
    spec = {"name": "deepseekmoe16b_layer", "hidden": HIDDEN,
            "experts": {"routed": ROUTED, "shared": SHARED, "width": WIDTH, "top_k": TOP_K},
            "router": {"score": "softmax"}}
    if quantization:
        spec["quantization"] = quantization
    return spec


def touched_bytes(graph, weights, expert_ids: torch.Tensor) -> int:
    """Weight bytes a call reads: every weight outside the routed experts, and the routed experts' tensors
    (codes, scales, zero points, or the float stack) for each expert hit."""
    hit = torch.unique(expert_ids).numel()
    total = 0
    for name, t in weights.items():
        size = t.numel() * t.element_size()
        total += size * hit // ROUTED if name.startswith("experts.") else size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--long", action="store_true", help="also 1024 tokens")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--no-ort", action="store_true", help="leave out the onnxruntime QMoE export")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens_list = list(args.tokens) + ([1024] if args.long else [])

    bandwidth = copy_bandwidth()
    print(f"CPU: {cpu_model()}; {args.threads} threads; torch {torch.__version__}")
    print(f"copy bandwidth (512 MiB clone, read + write): {bandwidth / 1e9:.1f} GB/s")
    print(f"layer: hidden {HIDDEN}, {ROUTED} routed experts of width {WIDTH}, {SHARED} shared, top-{TOP_K}, softmax; "
          f"block {args.block}; {args.repeats} repeats, interleaved")

    float_graph = build_graph(spec_from_dict(layer_spec(None)))
    float_weights = init_weights(float_graph, 0)
    backend = get_backend("torch")
    contenders = {}
    contenders["float32"] = (float_graph, float_weights, {})
    for fmt in ("int8", "int4"):
        graph = build_graph(spec_from_dict(layer_spec({"format": fmt, "block": args.block})))
        contenders[fmt] = (graph, quantize_weights(graph, float_weights), {})
    contenders["int4 fused"] = (contenders["int4"][0], contenders["int4"][1], {"int4_activations": "fused"})
    contenders["int4 bf16-act"] = (contenders["int4"][0], contenders["int4"][1], {"int4_activations": "bf16"})
    runners = {}
    for label, (graph, weights, options) in contenders.items():
        runners[label] = backend.prepare(run_pipeline(graph, backend.pipeline), weights, **options)
    if not args.no_ort:
        ort = get_backend("onnx:ort")
        contenders["ort float32"] = (float_graph, float_weights, {})
        runners["ort float32"] = ort.prepare(run_pipeline(float_graph, ort.pipeline), float_weights,
                                             threads=args.threads)
        for fmt in ("int8", "int4"):
            graph, weights, _ = contenders[fmt]
            contenders[f"ort {fmt} QMoE"] = (graph, weights, {})
            runners[f"ort {fmt} QMoE"] = ort.prepare(run_pipeline(graph, ort.pipeline), weights,
                                                     threads=args.threads)
            contenders[f"ort {fmt} QMoE int8-act"] = (graph, weights, {})
            runners[f"ort {fmt} QMoE int8-act"] = ort.prepare(run_pipeline(graph, ort.pipeline), weights,
                                                              threads=args.threads, int4_activations="int8")

    del float_weights  # each runner holds its own copy
    for tokens in tokens_list:
        x = torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(tokens))
        times = {label: [] for label in runners}
        cpu = {label: [] for label in runners}
        outputs = {}
        with torch.no_grad():
            for label, run in runners.items():  # warm-up (folds the packed weights once, compiles kernels)
                outputs[label] = run(x)
                run(x)
            for _ in range(args.repeats):
                for label, run in runners.items():
                    t, c = time.perf_counter(), time.process_time()
                    run(x)
                    times[label].append(time.perf_counter() - t)
                    cpu[label].append(time.process_time() - c)
        ref = outputs["float32"]["out"].double()
        print(f"\n{tokens} token(s):")
        width = max(map(len, times))
        print(f"{'path':{width}} {'median ms':>10} {'best ms':>9} {'vs float32':>10} {'cpu ms':>8} {'vs float32':>10} "
              f"{'MB touched':>10} {'GB/s':>6} {'of copy bw':>10} {'rel err vs float32':>18}")
        base = statistics.median(times["float32"])
        base_cpu = statistics.median(cpu["float32"])
        for label, ts in times.items():
            graph, weights, _ = contenders[label]
            med, best = statistics.median(ts), min(ts)
            touched = touched_bytes(graph, weights, outputs[label]["expert_idx"])
            rate = touched / med
            err = float((outputs[label]["out"].double() - ref).norm() / ref.norm())
            cmed = statistics.median(cpu[label])
            print(f"{label:{width}} {med * 1e3:10.2f} {best * 1e3:9.2f} {base / med:9.2f}x {cmed * 1e3:8.2f} "
                  f"{base_cpu / cmed:9.2f}x {touched / 1e6:10.1f} "
                  f"{rate / 1e9:6.1f} {rate / bandwidth:9.0%} {err:18.2e}")


if __name__ == "__main__":
    main()
