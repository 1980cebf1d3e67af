"""`moe-ir generate`: token generation from a spec, a built torch folder, a built ONNX decoder folder or a Hugging
Face checkpoint folder.

Part of the command-line layer (like moe_ir/cli.py, not the core): it reads user formats through the
frontends and runs a backend's step of the decode graph through moe_ir.generation's loop. cli.py imports
it only when the command runs, so `moe-ir --help` stays light.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .errors import SpecError, UsageError, WeightsError

__all__ = ["Source", "load_source", "parse_prompts", "run_generate", "sampler"]

# A built torch folder and its weights file (backends/torch_eager/backend.py writes both).
BUILT_SPEC, BUILT_WEIGHTS = "spec.yaml", "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Source:
    """What generation runs: the model spec, its canonical weights (None: seeded random ones), the folder
    a tokenizer may sit in, the end-of-sequence id the checkpoint declares (None: none) and the longest
    sequence it was made for (max_position_embeddings; None: not stated)."""
    spec: Any
    weights: dict[str, torch.Tensor] | None
    folder: Path | None
    eos_token_id: int | None = None
    description: str = ""
    max_positions: int | None = None


def _weights_spec_hash(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("spec_hash")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({' '.join(str(err).split())[:200]})") from None


def _load_weights_for(spec, path: Path, where: str) -> dict[str, torch.Tensor]:
    """Weights of `spec` from a safetensors file, refused when its metadata names another spec: a weights
    file written for one spec (build, import-hf) records that spec's hash."""
    from .model_builder import build_model_graph, model_spec_hash
    from .params import ensure_memory_for, load_weights

    recorded = _weights_spec_hash(path)
    if recorded and recorded != model_spec_hash(spec):
        raise WeightsError(f"{path} was written for another spec (spec hash {recorded[:12]}..., {where} hashes to "
                           f"{model_spec_hash(spec)[:12]}...): the files do not belong together; rebuild the folder "
                           f"or pass the weights made for this spec")
    graph = build_model_graph(spec)
    ensure_memory_for(graph, f"loading {path}")
    notes: list[str] = []
    weights = load_weights(path, graph, notes=notes)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return weights


def _hf_config_ints(folder: Path) -> tuple[int | None, int | None]:
    """(end-of-sequence id, max_position_embeddings) of a checkpoint's config.json (eos: the first of a list);
    None where it states none."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8")[: 1 << 20])
    except (OSError, ValueError):
        return None, None
    data = data if isinstance(data, dict) else {}
    eos, longest = data.get("eos_token_id"), data.get("max_position_embeddings")
    if isinstance(eos, list):
        eos = eos[0] if eos else None

    def plain_int(v):
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    return plain_int(eos), plain_int(longest)


def load_source(source: str, weights_path: str | None, shrink: int | None = None) -> Source:
    """SOURCE -> Source: a model spec YAML (`--weights` or seeded random weights; `shrink`: its miniature at
    that hidden size, as `validate --shrink`), a folder `moe-ir build --backend torch` wrote (spec.yaml +
    weights.safetensors), or a Hugging Face checkpoint folder (config.json + safetensors)."""
    from .frontends import load_any
    from .model_spec import ModelSpec, miniature_model

    path = Path(source)
    if shrink is not None and (path.is_dir() or weights_path):
        raise UsageError("--shrink makes a miniature of a spec with random weights; it cannot be combined with "
                         + ("a folder, which brings its own weights" if path.is_dir() else "--weights"))
    if path.is_dir():
        if weights_path:
            raise UsageError(f"--weights goes with a spec file; {source} is a folder, which brings its own weights")
        if (path / "config.json").is_file():
            from .frontends.hf.checkpoint import load_hf_checkpoint

            spec, weights = load_hf_checkpoint(path)
            eos, longest = _hf_config_ints(path)
            return Source(spec, weights, path, eos, f"Hugging Face checkpoint {path}", longest)
        if (path / BUILT_SPEC).is_file() and (path / BUILT_WEIGHTS).is_file():
            spec = load_any(path / BUILT_SPEC)
            if not isinstance(spec, ModelSpec):
                raise SpecError(f"{path / BUILT_SPEC}: a layer spec; generate needs a whole model (model: and moe:)")
            weights = _load_weights_for(spec, path / BUILT_WEIGHTS, str(path / BUILT_SPEC))
            return Source(spec, weights, path, None, f"built folder {path}")
        raise UsageError(f"{source}: neither a Hugging Face checkpoint folder (config.json + safetensors) nor a "
                         f"folder `moe-ir build --backend torch` wrote ({BUILT_SPEC} + {BUILT_WEIGHTS})")
    if not path.exists():
        raise UsageError(f"{source}: no such spec file or folder")
    spec = load_any(path)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{source}: a layer spec; generate needs a whole model (a spec with model: and moe:)")
    if shrink is not None:
        spec = miniature_model(spec, shrink)
    weights = _load_weights_for(spec, Path(weights_path), source) if weights_path else None
    return Source(spec, weights, path.parent, None, f"spec {source}")


# ------------------------------------------------------------------------------------------------
# prompts


def _parse_ids(text: str, where: str) -> list[int]:
    items = text.replace(",", " ").split()
    if not items:
        raise UsageError(f"{where}: empty prompt; give at least one token id")
    ids = []
    for item in items:
        try:
            ids.append(int(item) if len(item) <= 20 else None)
        except ValueError:
            ids.append(None)
        if ids[-1] is None:
            raise UsageError(f"{where}: {item[:30]!r} is not a token id (whole numbers separated by spaces)")
    return ids


def parse_prompts(args: argparse.Namespace, tokenizer) -> list[list[int]]:
    """The prompts as id lists: --prompt-ids, --prompt-file (one prompt a line) or --prompt (tokenized)."""
    given = [name for name in ("prompt_ids", "prompt_file", "prompt") if getattr(args, name) is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --prompt-ids, --prompt-file, --prompt"
                         + (f" (found {', '.join('--' + g.replace('_', '-') for g in given)})" if given else ""))
    if args.prompt_ids is not None:
        return [_parse_ids(args.prompt_ids, "--prompt-ids")]
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read(1 << 24)
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"--prompt-file {args.prompt_file}: cannot read it ({err})") from None
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if not lines:
            raise UsageError(f"--prompt-file {args.prompt_file}: no prompt in it (one list of token ids a line)")
        return [_parse_ids(line, f"--prompt-file {args.prompt_file}:{n}") for n, line in lines]
    if tokenizer is None:
        raise UsageError(f"--prompt needs a tokenizer: the source folder has no {TOKENIZER_FILE} (or the "
                         f"`tokenizers` package is missing: pip install 'moe-ir[hf]'); give --prompt-ids instead")
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise UsageError("--prompt: the text gives no token; give a non-empty prompt")
    return [list(ids)]


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, S], mask [B, S]) with each prompt right-aligned; padding is masked out, so its id is moot."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def load_tokenizer(folder: Path | None):
    if folder is None or not (folder / TOKENIZER_FILE).is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as err:  # noqa: BLE001 - the tokenizers package raises its own untyped errors
        raise UsageError(f"{folder / TOKENIZER_FILE}: not a tokenizer file the `tokenizers` package reads "
                         f"({' '.join(str(err).split())[:200]})") from None


# ------------------------------------------------------------------------------------------------
# sampling


def sampler(temperature: float, top_k: int | None, top_p: float | None,
            seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """choose(logits [B, V]) -> tokens [B]: softmax(logits / temperature) restricted to the top_k most likely
    tokens and to the smallest set whose probability reaches top_p, drawn from a generator seeded once (the
    same seed gives the same tokens)."""
    generator = torch.Generator().manual_seed(seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.detach().to("cpu", torch.float64) / temperature
        if top_k is not None and top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if top_p is not None and top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            # Keep a token while the probability before it is under top_p: the most likely always stays.
            drop = (probs.cumsum(dim=-1) - probs) >= top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, -math.inf))
        return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator)[:, 0]

    return choose


# ------------------------------------------------------------------------------------------------
# the command


class _TimedStep:
    """The step, with the first call (prefill, which also gives the first token) timed apart from the rest."""

    def __init__(self, step):
        self.step = step
        self.times: list[float] = []

    def __call__(self, inputs: Mapping[str, torch.Tensor]):
        start = time.perf_counter()
        out = self.step(inputs)
        self.times.append(time.perf_counter() - start)
        return out


def _trim_after_eos(row: list[int], eos: int | None) -> list[int]:
    return row[: row.index(eos) + 1] if eos is not None and eos in row else row


def _check_options(args: argparse.Namespace) -> None:
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    option = getattr(args, "int4_activations", None)
    if option in ("bf16", "fused") and args.backend != "torch":
        raise UsageError(f"--int4-activations {option} is an option of the torch backend (its int4 decode "
                         f"kernel); drop it or use --backend torch")
    if option == "int8" and args.backend != "onnx:ort":
        raise UsageError("--int4-activations int8 is an option of --backend onnx:ort (ONNX Runtime's QMoE and "
                         "MatMulNBits on int8 activations); drop it or use that backend")


def _int4_activations_options(args: argparse.Namespace, graph) -> dict:
    """The prepare option `--int4-activations` stands for (torch: bf16/fused; onnx:ort: int8); refused where no
    weight takes it."""
    if not getattr(args, "int4_activations", None):
        return {}
    from .quantization import dequantize_nodes
    from .spec import QuantFormat

    if args.int4_activations == "int8":  # the ort lowering's own rule, asked before any session is made
        from .backends.onnx import Flavour, int8_activations_refusal

        reason = int8_activations_refusal(graph, Flavour.ORT, "int8")
        if reason:
            raise UsageError(f"--int4-activations int8: {reason}")
        return {"int4_activations": "int8"}
    blocks = (32, 64, 128, 256) if args.int4_activations == "bf16" else None  # what torch's int4 matmul takes
    if not any(n.attrs["format"] == QuantFormat.INT4 and (blocks is None or n.attrs["block"] in blocks)
               for n in dequantize_nodes(graph)):
        raise UsageError(f"--int4-activations {args.int4_activations}: no weight is int4"
                         f"{' with a block of 32..256' if blocks else ''}; add --quantize int4:32, or drop the option")
    return {"int4_activations": args.int4_activations}


def _check_vocab(prompts: list[list[int]], vocab: int | None, name: str) -> None:
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if vocab is not None and not 0 <= t < vocab]
        if bad:
            where = f"prompt {row + 1}" if len(prompts) > 1 else "the prompt"
            raise UsageError(f"{where}: token id(s) {', '.join(map(str, bad[:6]))} outside the vocabulary "
                             f"[0, {vocab}) of {name}")


def _sampling(args: argparse.Namespace) -> bool:
    return args.temperature is not None or args.top_k is not None or args.top_p is not None


class _Stream:
    """One prompt: each token is written as it comes (text when a tokenizer is there); nothing after the
    end-of-sequence token is shown (the loop ends once every sequence has produced it)."""

    def __init__(self, enabled: bool, tokenizer, eos: int | None):
        self.enabled, self.tokenizer, self.eos = enabled, tokenizer, eos
        self.streamed: list[int] = []
        self.shown = ""
        self.stopped = False

    def __call__(self, tokens: torch.Tensor) -> None:
        if not self.enabled or self.stopped:
            return
        token = int(tokens[0])
        self.streamed.append(token)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(self.streamed)
            sys.stdout.write(text[len(self.shown):])
            self.shown = text
        else:
            sys.stdout.write(("" if len(self.streamed) == 1 else " ") + str(token))
        sys.stdout.flush()
        self.stopped = self.eos is not None and token == self.eos


def _report(args: argparse.Namespace, tokens: torch.Tensor, times: list[float], prompt_tokens: int, batch: int,
            stream: _Stream, tokenizer, eos: int | None, description: str) -> int:
    """The generated rows on stdout (or --json), prefill and decode tokens/s on stderr."""
    rows = [_trim_after_eos(r, eos) for r in tokens.tolist()]
    texts = [tokenizer.decode(r) for r in rows] if tokenizer is not None else None
    prefill_s = times[0]
    decode_s = sum(times[1:])
    decode_tokens = batch * (len(times) - 1)
    prefill_rate = prompt_tokens / prefill_s if prefill_s > 0 else float("inf")
    decode_rate = decode_tokens / decode_s if decode_s > 0 else None
    if args.json:
        report = {"tokens": rows, "prefill_tokens_per_s": round(prefill_rate, 3),
                  "decode_tokens_per_s": round(decode_rate, 3) if decode_rate is not None else None}
        if texts is not None:
            report["text"] = texts
        print(json.dumps(report))
    else:
        if stream.enabled:
            sys.stdout.write("\n")
        else:
            for row, text in zip(rows, texts or [None] * len(rows)):
                print(text if text is not None else " ".join(map(str, row)))
        sys.stdout.flush()
    print(f"prefill: {prompt_tokens} tokens in {prefill_s:.3f} s ({prefill_rate:,.1f} tokens/s); decode: "
          + (f"{decode_tokens} tokens in {decode_s:.3f} s ({decode_rate:,.1f} tokens/s)" if decode_rate is not None
             else "no step after prefill (--max-new-tokens 1)")
          + f" [{args.backend}, {description}]", file=sys.stderr)
    return 0


def _decoder_folder(source: str) -> Path | None:
    """SOURCE as a folder `moe-ir build --backend onnx --decoder` wrote (None when it is not one)."""
    from .backends.onnx.genai import DECODER_FILE

    path = Path(source)
    return path if path.is_dir() and (path / DECODER_FILE).is_file() else None


def _run_decoder_folder(args: argparse.Namespace, folder: Path) -> int:
    """Generation from a built ONNX decoder folder: moe-ir's ONNX Runtime runner (onnx:<flavour>, the flavour
    the folder was built with) or onnxruntime-genai (genai, where the build wrote genai_config.json)."""
    from .backends.onnx import genai_generate, load_decoder
    from .backends.onnx.genai import GENAI_CONFIG, check_genai_folder
    from .generation import greedy_generate

    if args.weights or args.mla_cache or args.shrink or args.dtype or args.quantize:
        raise UsageError(f"{folder} is a built decoder: its weights, sizes, dtype, quantization and cache layout "
                         f"were fixed when it was built (drop --weights / --shrink / --dtype / --quantize / "
                         f"--mla-cache)")
    if args.backend != "genai" and args.backend.partition(":")[0] != "onnx":
        raise UsageError(f"{folder} holds an ONNX decoder; generate from it with --backend onnx:<flavour> or genai "
                         f"(or give the spec to run it on {args.backend})")
    tokenizer = load_tokenizer(folder)
    config = check_genai_folder(folder) if args.backend == "genai" or (folder / GENAI_CONFIG).is_file() else None
    eos = config["model"].get("eos_token_id") if config else None
    eos = eos if isinstance(eos, int) and not isinstance(eos, bool) else None
    eos = args.eos_token_id if args.eos_token_id is not None else eos
    prompts = parse_prompts(args, tokenizer)
    stream = _Stream(len(prompts) == 1 and not args.json, tokenizer, eos)
    if args.backend == "genai":
        _check_vocab(prompts, config["model"].get("vocab_size"), str(folder))
        run = genai_generate(folder, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed, on_token=stream)
        tokens, times = run.tokens, run.times
    else:
        decoder = load_decoder(folder)
        wanted = args.backend.partition(":")[2]
        if decoder.flavour.value != wanted:
            raise UsageError(f"{folder} was built with --flavour {decoder.flavour.value}; use --backend "
                             f"onnx:{decoder.flavour.value}, or rebuild it with --flavour {wanted}")
        _check_vocab(prompts, decoder.vocab_size, str(folder))
        ids, mask = left_padded(prompts)
        step = _TimedStep(decoder.step)
        choose = sampler(args.temperature or 1.0, args.top_k, args.top_p, args.seed) if _sampling(args) else None
        result = greedy_generate(step, decoder.entries, ids, mask, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=eos, choose=choose, on_token=stream, stop_at_eos=True)
        tokens, times = result.tokens, step.times
    return _report(args, tokens, times, sum(len(p) for p in prompts), len(prompts), stream, tokenizer, eos,
                   f"decoder folder {folder}")


def run_generate(args: argparse.Namespace) -> int:
    from .backends import get_backend
    from .model_builder import GraphForm, MLACacheLayout, build_model_graph
    from .model_spec import AttentionKind
    from .params import ensure_memory_for, init_weights
    from .passes import run_pipeline

    _check_options(args)
    folder = _decoder_folder(args.source)
    if folder is not None:
        return _run_decoder_folder(args, folder)
    if args.backend == "genai":
        raise UsageError(f"--backend genai runs a built decoder folder; build one with `moe-ir build {args.source} "
                         f"--backend onnx --decoder -o DIR`, then `moe-ir generate DIR --backend genai`")
    backend = get_backend(args.backend)  # an unknown name: the registry's error lists the known ones
    source = load_source(args.source, args.weights, args.shrink)
    spec = source.spec
    if args.dtype is not None and args.dtype != spec.model.dtype.value:
        # e.g. a bf16 checkpoint in float32 on a CPU path (AOTInductor's) that does not run bf16
        from .validate import with_dtype

        spec = with_dtype(spec, args.dtype)
        if source.weights is not None:
            target = getattr(torch, args.dtype)
            source.weights = {k: v.to(target) if v.is_floating_point() else v for k, v in source.weights.items()}
    quantizing = bool(args.quantize)
    if quantizing:
        from .cli import quantized_spec

        spec = quantized_spec(spec, args.quantize)
    is_mla = spec.model.attention.kind == AttentionKind.MLA
    if args.mla_cache is not None and not is_mla:
        raise UsageError(f"--mla-cache chooses an MLA model's cache layout; {spec.name} has "
                         f"{spec.model.attention.kind.value} attention")
    tokenizer = load_tokenizer(source.folder if Path(args.source).is_dir() else None)
    prompts = parse_prompts(args, tokenizer)
    vocab = spec.model.vocab_size
    _check_vocab(prompts, vocab, spec.name)
    longest = max(len(p) for p in prompts)
    if source.max_positions is not None and longest + args.max_new_tokens > source.max_positions:
        raise UsageError(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} is longer than the "
                         f"{source.max_positions} positions {spec.name} was made for (max_position_embeddings); "
                         f"shorten the prompt or ask for fewer tokens")
    ids, mask = left_padded(prompts)

    layout = MLACacheLayout(args.mla_cache or "expanded")
    full = build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout if is_mla else MLACacheLayout.EXPANDED)
    weights = source.weights
    if weights is None:
        ensure_memory_for(full, "initialising random weights")
        weights = init_weights(full, args.weights_seed)
    elif quantizing:  # float weights of the source, quantized as the option says
        from .quantization import quantize_weights

        weights = quantize_weights(full, weights)
    graph = run_pipeline(full, backend.pipeline)
    ok, reason = backend.supports(graph)
    if not ok:
        raise UsageError(f"backend '{args.backend}' cannot run the decode graph of {spec.name}: {reason}")
    step = _TimedStep(backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights},
                                      **_int4_activations_options(args, graph)))

    choose = sampler(args.temperature or 1.0, args.top_k, args.top_p, args.seed) if _sampling(args) else None
    eos = args.eos_token_id if args.eos_token_id is not None else source.eos_token_id
    if args.eos_token_id is not None and not 0 <= eos < vocab:
        raise UsageError(f"--eos-token-id {eos} is outside the vocabulary [0, {vocab}) of {spec.name}")
    eos = eos if eos is not None and 0 <= eos < vocab else None
    stream = _Stream(len(prompts) == 1 and not args.json, tokenizer, eos)

    from .generation import greedy_generate

    result = greedy_generate(step, graph, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                             choose=choose, on_token=stream, stop_at_eos=True)
    return _report(args, result.tokens, step.times, int(mask.sum()), len(prompts), stream, tokenizer, eos,
                   source.description)
