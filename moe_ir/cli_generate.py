"""`moe-ir generate`: token generation from a spec, a built torch folder or a Hugging Face checkpoint folder.

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

__all__ = ["GENERATE_BACKENDS", "Source", "load_source", "parse_prompts", "run_generate", "sampler"]

GENERATE_BACKENDS = ("torch", "reference")
# A built torch folder and its weights file (backends/torch_eager/backend.py writes both).
BUILT_SPEC, BUILT_WEIGHTS = "spec.yaml", "weights.safetensors"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Source:
    """What generation runs: the model spec, its canonical weights (None: seeded random ones), the folder
    a tokenizer may sit in, and the end-of-sequence id the checkpoint declares (None: none)."""
    spec: Any
    weights: dict[str, torch.Tensor] | None
    folder: Path | None
    eos_token_id: int | None = None
    description: str = ""


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


def _hf_eos(folder: Path) -> int | None:
    """The checkpoint's end-of-sequence id (config.json `eos_token_id`, the first of a list)."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8")[: 1 << 20])
    except (OSError, ValueError):
        return None
    eos = data.get("eos_token_id") if isinstance(data, dict) else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def load_source(source: str, weights_path: str | None) -> Source:
    """SOURCE -> Source: a model spec YAML (`--weights` or seeded random weights), a folder `moe-ir build
    --backend torch` wrote (spec.yaml + weights.safetensors), or a Hugging Face checkpoint folder
    (config.json + safetensors)."""
    from .frontends import load_any
    from .model_spec import ModelSpec

    path = Path(source)
    if path.is_dir():
        if weights_path:
            raise UsageError(f"--weights goes with a spec file; {source} is a folder, which brings its own weights")
        if (path / "config.json").is_file():
            from .frontends.hf.checkpoint import load_hf_checkpoint

            spec, weights = load_hf_checkpoint(path)
            return Source(spec, weights, path, _hf_eos(path), f"Hugging Face checkpoint {path}")
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


def run_generate(args: argparse.Namespace) -> int:
    from .backends import get_backend
    from .model_builder import GraphForm, MLACacheLayout, build_model_graph
    from .model_spec import AttentionKind
    from .params import ensure_memory_for, init_weights
    from .passes import run_pipeline

    if args.backend not in GENERATE_BACKENDS:
        raise UsageError(f"generate runs on {', '.join(GENERATE_BACKENDS)}, not '{args.backend}'")
    if args.temperature is not None and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be a positive number, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    source = load_source(args.source, args.weights)
    spec = source.spec
    quantizing = bool(getattr(args, "quantize", None))
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
    for row, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            where = f"prompt {row + 1}" if len(prompts) > 1 else "the prompt"
            raise UsageError(f"{where}: token id(s) {', '.join(map(str, bad[:6]))} outside the vocabulary "
                             f"[0, {vocab}) of {spec.name}")
    ids, mask = left_padded(prompts)

    layout = MLACacheLayout(args.mla_cache or "expanded")
    full = build_model_graph(spec, form=GraphForm.DECODE, mla_cache=layout if is_mla else MLACacheLayout.EXPANDED)
    backend = get_backend(args.backend)
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
    step = _TimedStep(backend.prepare(graph, {k: v for k, v in weights.items() if k in graph.weights}))

    sampling = args.temperature is not None or args.top_k is not None or args.top_p is not None
    choose = sampler(args.temperature or 1.0, args.top_k, args.top_p, args.seed) if sampling else None
    eos = source.eos_token_id if source.eos_token_id is not None and 0 <= source.eos_token_id < vocab else None

    streamed: list[int] = []
    shown_text = ""
    stream = len(prompts) == 1 and not args.json
    stopped = False

    def on_token(tokens: torch.Tensor) -> None:
        # One prompt: each token is written as it comes (text when a tokenizer is there); after the
        # end-of-sequence token the loop runs on (it has a fixed length) but nothing more is shown.
        nonlocal shown_text, stopped
        if not stream or stopped:
            return
        token = int(tokens[0])
        streamed.append(token)
        if tokenizer is not None:
            text = tokenizer.decode(streamed)
            sys.stdout.write(text[len(shown_text):])
            shown_text = text
        else:
            sys.stdout.write(("" if len(streamed) == 1 else " ") + str(token))
        sys.stdout.flush()
        stopped = eos is not None and token == eos

    from .generation import greedy_generate

    result = greedy_generate(step, graph, ids, mask, max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                             choose=choose, on_token=on_token)
    rows = [_trim_after_eos(r, eos) for r in result.tokens.tolist()]
    texts = [tokenizer.decode(r) for r in rows] if tokenizer is not None else None

    prompt_tokens = int(mask.sum())
    prefill_s = step.times[0]
    decode_s = sum(step.times[1:])
    decode_tokens = len(prompts) * (len(step.times) - 1)
    prefill_rate = prompt_tokens / prefill_s if prefill_s > 0 else float("inf")
    decode_rate = decode_tokens / decode_s if decode_s > 0 else None
    if args.json:
        report = {"tokens": rows, "prefill_tokens_per_s": round(prefill_rate, 3),
                  "decode_tokens_per_s": round(decode_rate, 3) if decode_rate is not None else None}
        if texts is not None:
            report["text"] = texts
        print(json.dumps(report))
    else:
        if stream:
            sys.stdout.write("\n")
        else:
            for row, text in zip(rows, texts or [None] * len(rows)):
                print(text if text is not None else " ".join(map(str, row)))
        sys.stdout.flush()
    print(f"prefill: {prompt_tokens} tokens in {prefill_s:.3f} s ({prefill_rate:,.1f} tokens/s); decode: "
          + (f"{decode_tokens} tokens in {decode_s:.3f} s ({decode_rate:,.1f} tokens/s)" if decode_rate is not None
             else "no step after prefill (--max-new-tokens 1)")
          + f" [{args.backend}, {source.description}]", file=sys.stderr)
    return 0
