"""Decode throughput: moe-ir's eager backend against transformers' `generate`, same checkpoint, one run.

The model is OLMoE-shaped (transformers' OlmoeForCausalLM: GQA-free attention with q/k norm, 64 routed
experts, top-8, no shared expert) scaled to about 2B parameters (hidden 2048, 16 layers, expert width 256,
vocabulary 50,304: 2.09B, 0.58B activated per token), random weights saved once with `save_pretrained` in
--workdir and reused. moe-ir reads that folder through `load_hf_checkpoint` (the path `moe-ir generate
FOLDER` takes) and runs the decode graph on the eager backend; transformers loads the same folder with
`from_pretrained`. Both are greedy, float32, --threads threads.

Each row: prompt --prompt ids (random, the same for both), --new-tokens new tokens, at batch 1 and 8.
Rows run interleaved (each repeat runs every contender at every batch once, in turn) and the table gives
the median of --repeats: prefill tokens/s (prompt tokens over the first call, which also yields the first
token) and decode tokens/s (the other new tokens over their time; for transformers the difference between a
1-token and a full `generate`). Peak memory is the peak resident set sampled every 5 ms during the row, above
the resident set before it (weights are loaded before and not counted).

The roofline: a decode step at batch 1 must read every activated parameter once (attention, norms, router,
top-k experts, the output head; one embedding row); at the read bandwidth measured in the same run (one pass
over a 1 GiB tensor) that bounds the tokens/s at bytes-per-token / bandwidth. The table gives each batch-1
row's fraction of that bound.

    python tools/bench_generate.py [--layers 16] [--prompt 128] [--new-tokens 64] [--repeats 2]
        [--batches 1 8] [--workdir DIR] [--threads 2]
"""
from __future__ import annotations

import argparse
import tempfile
import gc
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from moe_ir.backends import get_backend
from moe_ir.frontends.hf.checkpoint import load_hf_checkpoint
from moe_ir.generation import greedy_generate
from moe_ir.model_builder import build_model_graph
from moe_ir.passes import run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager import cpu_model  # noqa: E402 - the tools folder is not a package

SHAPE = dict(vocab_size=50304, hidden_size=2048, num_attention_heads=16, num_key_value_heads=16,
             intermediate_size=256, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
             tie_word_embeddings=False, max_position_embeddings=4096)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakResident:
    """The peak resident set while active, sampled by a thread every 5 ms, above the set at entry."""

    def __enter__(self):
        self.base = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.extra_mib = (self.peak - self.base) / 2**20


def read_bandwidth() -> float:
    """GB/s of the best of 5 sums over a 1 GiB float32 tensor (one read pass, nothing written)."""
    big = torch.ones(2**28)
    big.sum()
    best = min(_timed(big.sum) for _ in range(5))
    del big
    return 2**30 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def checkpoint(workdir: Path, layers: int) -> Path:
    """The random OLMoE-shaped checkpoint folder, written once (save_pretrained) and reused."""
    import transformers

    folder = workdir / f"olmoe-{layers}l"
    if (folder / "config.json").is_file():
        return folder
    cfg = transformers.OlmoeConfig(num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def activated_bytes(spec, weights) -> int:
    """Bytes a batch-1 decode step reads: every weight, but top_k/routed of each routed-expert tensor and one
    row of the embedding."""
    total = 0
    for name, w in weights.items():
        if ".experts." in name and w.shape[0] == spec.moe.experts.routed:
            total += w.nbytes * spec.moe.experts.top_k // spec.moe.experts.routed
        elif name == "embed.weight":
            total += w[0].nbytes
        else:
            total += w.nbytes
    return total


class MoeIR:
    label = "moe-ir eager"

    def __init__(self, folder: Path):
        spec, weights = load_hf_checkpoint(folder)
        self.spec = spec
        self.bytes_per_token = activated_bytes(spec, weights)
        self.params = sum(w.numel() for w in weights.values())
        backend = get_backend("torch")
        self.graph = run_pipeline(build_model_graph(spec, form="decode"), backend.pipeline)
        self.step = backend.prepare(self.graph, {k: v for k, v in weights.items() if k in self.graph.weights})
        del weights
        gc.collect()

    def run(self, ids: torch.Tensor, new_tokens: int):
        times: list[float] = []

        def timed_step(inputs):
            start = time.perf_counter()
            out = self.step(inputs)
            times.append(time.perf_counter() - start)
            return out

        tokens = greedy_generate(timed_step, self.graph, ids, max_new_tokens=new_tokens).tokens
        return tokens, times[0], sum(times[1:])


class Transformers:
    label = "transformers generate"

    def __init__(self, folder: Path):
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # every row generates exactly new_tokens

    def _generate(self, ids, n):
        with torch.no_grad():
            return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)

    def run(self, ids: torch.Tensor, new_tokens: int):
        first = _timed(lambda: self._generate(ids, 1))
        start = time.perf_counter()
        out = self._generate(ids, new_tokens)
        whole = time.perf_counter() - start
        return out[:, ids.shape[1]:], first, max(whole - first, 1e-9)


def common_arguments(parser: argparse.ArgumentParser, *, layers: int, new_tokens: int) -> None:
    """The options both generation benchmarks take (this one and bench_generate_onnx.py)."""
    parser.add_argument("--layers", type=int, default=layers, help="decoder layers (16: 2.09B parameters)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=new_tokens)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "moe-ir-bench-generate",
                        help="where the checkpoint and builds go (default: moe-ir-bench-generate in the temp folder)")


def print_model_line(args, contender) -> float:
    """The model and roofline header; returns the batch-1 decode bound in tokens/s (read bandwidth measured now)."""
    bandwidth = read_bandwidth()
    bound = bandwidth * 1e9 / contender.bytes_per_token
    print(f"# model: OLMoE-shaped, {args.layers} layers, {contender.params / 1e9:.2f}B parameters, "
          f"{contender.bytes_per_token / 1e9:.2f} GB of activated parameters read per token (float32); read bandwidth "
          f"{bandwidth:.1f} GB/s -> batch-1 decode bound {bound:.2f} tokens/s", flush=True)
    print(f"# prompt {args.prompt}, {args.new_tokens} new tokens, greedy, median of {args.repeats} interleaved repeats",
          flush=True)
    return bound


def run_interleaved(contenders, args):
    """Every contender at every batch, --repeats times, interleaved (after a warm-up at every batch with the full
    prompts: first-call costs such as the allocator, thread pools and the first touch of weight pages a loader
    left memory-mapped stay out). Returns ({(label, batch): [(prefill tok/s, decode tok/s, +MiB)]},
    {(label, batch): the last run's new tokens})."""
    gen = torch.Generator().manual_seed(1)
    prompts = {b: torch.randint(0, SHAPE["vocab_size"], (b, args.prompt), generator=gen) for b in args.batches}
    for b in args.batches:
        for c in contenders:
            c.run(prompts[b], 4)
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    tokens: dict[tuple[str, int], torch.Tensor] = {}
    for repeat in range(args.repeats):
        for b in args.batches:
            for c in contenders:
                with PeakResident() as mem:
                    out, prefill_s, decode_s = c.run(prompts[b], args.new_tokens)
                row = (b * args.prompt / prefill_s, b * (args.new_tokens - 1) / decode_s, mem.extra_mib)
                results.setdefault((c.label, b), []).append(row)
                tokens[(c.label, b)] = out
                print(f"  repeat {repeat + 1} batch {b} {c.label}: prefill {row[0]:.1f} tok/s, decode {row[1]:.2f} "
                      f"tok/s, +{row[2]:.0f} MiB", file=sys.stderr, flush=True)
    return results, tokens


def print_table(contenders, results, base, bound: float, batches) -> None:
    """Medians per batch and contender, decode against `base` (a contender) and batch 1 against the roofline."""
    print(f"\n| batch | path | prefill tokens/s | decode tokens/s | vs {base.label} | of roofline | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        base_decode = statistics.median(r[1] for r in results[(base.label, b)])
        for c in contenders:
            rows = results[(c.label, b)]
            prefill, decode = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
            roof = f"{decode / bound:.0%}" if b == 1 else "-"
            print(f"| {b} | {c.label} | {prefill:.1f} | {decode:.2f} | {decode / base_decode:.2f}x | {roof} | "
                  f"+{max(r[2] for r in rows):.0f} MiB |")


def print_token_agreement(contenders, tokens, reference, batches) -> None:
    """Per batch, which contenders' greedy tokens equal `reference`'s."""
    for b in batches:
        ref = tokens[(reference.label, b)]
        others = [c.label for c in contenders if c is not reference]
        same = [label for label in others if torch.equal(tokens[(label, b)], ref)]
        differ = [label for label in others if label not in same]
        print(f"# batch {b}: greedy tokens identical to {reference.label}: {', '.join(same) or 'none'}"
              + (f"; DIFFER: {', '.join(differ)}" if differ else ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, layers=16, new_tokens=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"# {cpu_model()}, torch {torch.__version__}, {args.threads} threads", flush=True)
    folder = checkpoint(args.workdir, args.layers)
    ours = MoeIR(folder)
    theirs = Transformers(folder)
    bound = print_model_line(args, ours)
    contenders = (ours, theirs)
    results, tokens = run_interleaved(contenders, args)
    print_table(contenders, results, theirs, bound, args.batches)
    print_token_agreement(contenders, tokens, theirs, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
