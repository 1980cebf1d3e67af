"""Decode throughput of moe-ir's ONNX decoder: onnxruntime-genai on the `ort` export, moe-ir's own ONNX Runtime
runner on the same file, moe-ir eager and transformers' `generate`, same checkpoint, one run.

The checkpoint is bench_generate.py's OLMoE-shaped random model (hidden 2048, 64 routed experts of width 256,
top-8, q/k norm over the whole projection, vocabulary 50,304), --layers decoder layers (16: 2.09B parameters),
written once with `save_pretrained` into --workdir. The decoder folder is built from it with the command a user
runs (`moe-ir build FOLDER --backend onnx --flavour ort --decoder --external-data`), so GenAI and moe-ir's runner
read the same model.onnx: GroupQueryAttention, SkipSimplifiedLayerNormalization and com.microsoft.MoE where they
fit (the build's notes are printed). Every contender is greedy, float32, --threads threads (GenAI's session gets
the same intra-op thread count through genai_config.json).

Rows run interleaved (each repeat runs every contender at every batch once, in turn); the table gives the median
of --repeats: prefill tokens/s (prompt tokens over the call that also yields the first token) and decode tokens/s
(the other new tokens over their time). GenAI is held to exactly --new-tokens (min_length), as transformers is
(no end-of-sequence stop). The roofline: a batch-1 decode step reads every activated parameter once (one
embedding row, top-k of the routed experts); at the read bandwidth measured in the same run that bounds the
tokens/s. The table gives each batch-1 row's fraction of it.

    python tools/bench_generate_onnx.py [--layers 4] [--prompt 128] [--new-tokens 32] [--repeats 2]
        [--batches 1 8] [--workdir DIR] [--threads 2] [--no-transformers]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moe_ir.backends.onnx import load_decoder
from moe_ir.cli import main as moe_ir_main
from moe_ir.generation import greedy_generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eager import cpu_model  # noqa: E402 - the tools folder is not a package
from bench_generate import (MoeIR, Transformers, checkpoint, common_arguments, print_model_line,  # noqa: E402
                            print_table, print_token_agreement, run_interleaved)


def build_decoder(folder: Path, workdir: Path, threads: int) -> tuple[Path, list[str]]:
    """The ort decoder folder of the checkpoint (built once), its genai_config.json set to `threads`."""
    out = workdir / f"{folder.name}-ort-decoder"
    notes_file = out / "build-notes.json"
    if not (out / "genai_config.json").is_file():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            rc = moe_ir_main(["build", str(folder), "--backend", "onnx", "--flavour", "ort", "--decoder",
                              "--external-data", "-o", str(out), "--json"])
        if rc != 0:
            raise SystemExit(f"moe-ir build failed ({rc})")
        notes_file.write_text(json.dumps(json.loads(buffer.getvalue())["notes"]))
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config_path.write_text(json.dumps(config, indent=2))
    gc.collect()
    return out, json.loads(notes_file.read_text())


class GenAI:
    label = "GenAI (ort export)"

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))

    def run(self, ids: torch.Tensor, new_tokens: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        length = ids.shape[1] + new_tokens
        params.set_search_options(max_length=length, min_length=length, batch_size=ids.shape[0], do_sample=False)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(ids.numpy().astype(np.int32))
        generator.generate_next_token()   # the prompt's logits give the first token
        steps = [generator.get_next_tokens().copy()]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        while len(steps) < new_tokens:
            generator.generate_next_token()
            steps.append(generator.get_next_tokens().copy())
        decode = time.perf_counter() - start
        del generator
        return torch.from_numpy(np.stack(steps, axis=1).astype(np.int64)), prefill, decode


class OnnxRunner:
    label = "moe-ir ONNX runner (ort export)"

    def __init__(self, folder: Path, threads: int):
        self.decoder = load_decoder(folder, threads=threads)

    def run(self, ids: torch.Tensor, new_tokens: int):
        times: list[float] = []

        def timed_step(inputs):
            start = time.perf_counter()
            out = self.decoder.step(inputs)
            times.append(time.perf_counter() - start)
            return out

        tokens = greedy_generate(timed_step, self.decoder.entries, ids, max_new_tokens=new_tokens).tokens
        return tokens, times[0], sum(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, layers=4, new_tokens=32)
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers' generate out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    import onnxruntime_genai

    print(f"# {cpu_model()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, onnxruntime-genai "
          f"{onnxruntime_genai.__version__}, {args.threads} threads", flush=True)
    folder = checkpoint(args.workdir, args.layers)
    decoder_folder, notes = build_decoder(folder, args.workdir, args.threads)
    for note in notes:
        if note.startswith(("ort", "genai")):
            print(f"# build: {note}", flush=True)
    eager = MoeIR(folder)
    contenders = [GenAI(decoder_folder), OnnxRunner(decoder_folder, args.threads), eager]
    if not args.no_transformers:
        contenders.append(Transformers(folder))
    bound = print_model_line(args, eager)
    results, tokens = run_interleaved(contenders, args)
    print_table(contenders, results, eager, bound, args.batches)
    print_token_agreement(contenders, tokens, eager, args.batches)
    return 0


if __name__ == "__main__":
    sys.exit(main())
