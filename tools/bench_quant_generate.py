"""Whole-model decode with quantized experts: tokens/s of float32 against int8 and int4 (routed and shared
experts block-quantized, as `moe-ir generate SPEC --quantize int4:32` does) on the eager backend, in one run,
interleaved (each repeat generates once with every contender, in turn); median of the repeats.

The model is DeepSeekMoE-16B's spec (specs/models/deepseekmoe-16b.yaml: hidden 2048, MHA 16 heads, vocabulary
102,400, layer 0 dense of width 10,944, then 2 shared + 64 routed experts of width 1408, top-6) cut to --layers
layers (default 3: the dense layer and two MoE layers; the full model does not fit this machine in float32),
--vocab a smaller vocabulary, seeded random weights; every contender holds its own copy. Each contender builds the decode graph, quantizes the float weights (quantize_weights:
what `generate --quantize` runs), and generates --new-tokens greedy tokens after a --prompt-token prompt at
batch 1 (moe_ir.generation.greedy_generate, the CLI's loop).

Contenders:
  float32        the float model
  int8 / int4    exact: each expert hit dequantized on its own, then a float32 GEMM
  int4 fused     exact as int4; decode steps through the compiled fused int4 kernel (int4_activations="fused")
  int4 bf16-act  int4 decode steps through torch's int4 matmul on bfloat16 activations (`generate
                 --int4-activations bf16`)
  ort float32 / ort int4 / ort int4 int8-act
                 the onnx:ort backend's decode graph in onnxruntime (`generate --backend onnx:ort`): float32,
                 int4 experts as com.microsoft.QMoE / MatMulNBits (exact), and the same on int8 activations
                 (`--int4-activations int8`, not exact); --no-ort leaves them out

Each row: decode tokens/s (the new tokens after the first, over their steps' time; wall clock), the same
from the process's CPU time (steadier on a machine other processes share), both against float32, the weight
bytes one decode step reads (every weight but the embedding, of which one row, with top_k/routed of each
routed-expert tensor) and how many greedy tokens equal the float model's and the exact int4 model's.

    python tools/bench_quant_generate.py [--layers 3] [--prompt 32] [--new-tokens 16] [--repeats 3]
        [--threads 2] [--block 32] [--vocab V] [--no-ort]
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from moe_ir.backends import get_backend
from moe_ir.generation import greedy_generate
from moe_ir.model_builder import build_model_graph
from moe_ir.frontends import load_any
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.quantization import parse_quantize_option, quantize_weights, with_quantization

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager import cpu_model  # noqa: E402 - the tools folder is not a package

SPEC = Path(__file__).resolve().parent.parent / "specs" / "models" / "deepseekmoe-16b.yaml"


def step_bytes(spec, weights) -> int:
    """Weight bytes a batch-1 decode step reads: top_k/routed of each routed-expert tensor (codes, scales,
    zero points or floats), one embedding row, every other weight whole."""
    experts = spec.moe.experts
    total = 0
    for name, w in weights.items():
        if ".experts." in name and w.shape[0] == experts.routed:
            total += w.nbytes * experts.top_k // experts.routed
        elif name.startswith("embed.weight"):
            total += w.nbytes // w.shape[0]
        else:
            total += w.nbytes
    return total


class Contender:
    def __init__(self, label, spec, float_weights, quantize: str | None, options: dict, backend_name: str = "torch"):
        self.label = label
        if quantize:
            spec = with_quantization(spec, parse_quantize_option(quantize))
        full = build_model_graph(spec, form="decode")
        weights = quantize_weights(full, float_weights) if quantize else float_weights
        self.bytes = step_bytes(spec, {k: v for k, v in weights.items() if k in full.weights})
        backend = get_backend(backend_name)
        self.graph = run_pipeline(full, backend.pipeline)
        self.step = backend.prepare(self.graph, {k: v for k, v in weights.items() if k in self.graph.weights},
                                    **options)

    def run(self, ids: torch.Tensor, new_tokens: int):
        wall: list[float] = []
        cpu: list[float] = []

        def timed(inputs):
            t, c = time.perf_counter(), time.process_time()
            out = self.step(inputs)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            return out

        tokens = greedy_generate(timed, self.graph, ids, max_new_tokens=new_tokens).tokens
        return tokens, sum(wall[1:]), sum(cpu[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers kept (1 dense + MoE layers)")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (default: the model's)")
    parser.add_argument("--no-ort", action="store_true", help="leave out the onnx:ort contenders")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    spec = load_any(str(SPEC))
    spec = dataclasses.replace(spec, model=dataclasses.replace(spec.model, layers=args.layers,
                                                               vocab_size=args.vocab or spec.model.vocab_size))
    float_graph = build_model_graph(spec, form="decode")
    float_weights = init_weights(float_graph, 0)
    plans = [("float32", None, {}), ("int8", f"int8:{args.block}", {}), ("int4", f"int4:{args.block}", {}),
             ("int4 fused", f"int4:{args.block}", {"int4_activations": "fused"}),
             ("int4 bf16-act", f"int4:{args.block}", {"int4_activations": "bf16"})]
    if not args.no_ort:
        ort = {"threads": args.threads}
        plans += [("ort float32", None, ort, "onnx:ort"), ("ort int4", f"int4:{args.block}", ort, "onnx:ort"),
                  ("ort int4 int8-act", f"int4:{args.block}", {**ort, "int4_activations": "int8"}, "onnx:ort")]
    contenders = [Contender(label, spec, float_weights, *rest) for label, *rest in plans]
    del float_weights
    gc.collect()

    print(f"CPU: {cpu_model()}; {args.threads} threads; torch {torch.__version__}")
    print(f"model: {spec.name} cut to {args.layers} layers (layer 0 dense, then MoE: 2 shared + 64 routed of width "
          f"1408, top-6), vocabulary {spec.model.vocab_size}; routed and shared experts quantized, block "
          f"{args.block}; batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, {args.repeats} repeats, "
          f"interleaved")
    ids = torch.randint(0, spec.model.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    results = {c.label: ([], []) for c in contenders}
    tokens = {}
    with torch.no_grad():
        for c in contenders:  # warm-up: folds the packed layouts, compiles the fused kernel
            tokens[c.label] = c.run(ids, 3)[0]
        for _ in range(args.repeats):
            for c in contenders:
                out, wall, cpu = c.run(ids, args.new_tokens)
                tokens[c.label] = out
                results[c.label][0].append(wall)
                results[c.label][1].append(cpu)
    steps = args.new_tokens - 1
    base_wall = steps / statistics.median(results["float32"][0])
    base_cpu = steps / statistics.median(results["float32"][1])
    width = max(len(c.label) for c in contenders)
    print(f"\n{'path':{width}} {'decode tok/s':>12} {'vs float32':>10} {'cpu tok/s':>10} {'vs float32':>10} "
          f"{'MB/step':>8} {'= float32 tokens':>16} {'= int4 tokens':>13}")
    for c in contenders:
        wall = steps / statistics.median(results[c.label][0])
        cpu = steps / statistics.median(results[c.label][1])
        same_f = int((tokens[c.label] == tokens["float32"]).sum())
        same_q = int((tokens[c.label] == tokens["int4"]).sum())
        print(f"{c.label:{width}} {wall:12.2f} {wall / base_wall:9.2f}x {cpu:10.2f} {cpu / base_cpu:9.2f}x "
              f"{c.bytes / 1e6:8.0f} {same_f:>9}/{args.new_tokens:<6} {same_q:>6}/{args.new_tokens:<6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
