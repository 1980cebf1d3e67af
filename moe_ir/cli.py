"""The `moe-ir` command line.

Every failure moe-ir anticipates is a MoeIRError: it is printed as one line on stderr and the process
exits non-zero (2 for a bad spec or bad usage, 1 otherwise) without a traceback. Commands that report
take `--json` for scripts; the keys are documented in README.md.
"""
from __future__ import annotations

import os
import signal
import sys


def _exit_quietly_on_interrupt(signum, frame) -> None:
    os._exit(130)


# The `moe-ir` console script imports this module (and the package) before main() and its error boundary
# run: a Ctrl-C in those imports would print a traceback. In that script only (a library importing the
# module keeps its own handler), Ctrl-C exits 130 quietly until main() takes over.
if os.path.basename(sys.argv[0] if sys.argv else "") == "moe-ir" and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _exit_quietly_on_interrupt)

import argparse  # noqa: E402 - after the handler above, which covers these imports
import importlib  # noqa: E402
import json  # noqa: E402
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import BackendError, MoeIRError, SpecError, UsageError

# Modules that contribute sub-commands with `add_command(subparsers)`; they import their heavy
# dependencies lazily so `moe-ir --help` stays fast and works without the optional extras.
_COMMAND_MODULES = ("moe_ir.frontends.hf", "moe_ir.maxvio")


def _load_spec(path: str):
    """A layer spec or a model spec (a document with `model:` and `moe:`)."""
    from .frontends import load_any

    return load_any(path)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .analysis import analyse, format_analysis
    from .frontends import load_any
    from .model_spec import ModelSpec

    spec = load_any(args.spec)
    if isinstance(spec, ModelSpec):
        from .model_analysis import analyse_model, format_model_analysis

        model_result = analyse_model(spec, context=getattr(args, "context", None))
        if args.json:
            print(json.dumps(model_result.to_dict(), indent=2))
        else:
            sys.stdout.write(format_model_analysis(model_result, spec))
        return 0
    result = analyse(spec)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        sys.stdout.write(format_analysis(result))
    return 0


def _pipeline_for(args: argparse.Namespace) -> list[str]:
    from .passes import PASSES, PIPELINES

    if args.passes:
        names = [p.strip() for p in args.passes.split(",") if p.strip()]
    else:
        if args.pipeline not in PIPELINES:  # not argparse choices: listing them would import torch for --help
            raise UsageError(f"unknown pipeline '{args.pipeline}'; choose one of {', '.join(PIPELINES)}")
        names = list(PIPELINES[args.pipeline])
    for n in names:
        if n not in PASSES:
            raise SpecError(f"unknown pass '{n}'; known passes: {', '.join(PASSES)}")
    if args.after:
        if args.after not in names:
            raise SpecError(f"--after {args.after}: not in the pipeline {names}")
        names = names[: names.index(args.after) + 1]
    return names


def _cmd_graph(args: argparse.Namespace) -> int:
    from .builder import build_graph
    from .ir import to_dot, to_json, to_text
    from .model_spec import ModelSpec
    from .passes import run_pipeline

    spec = _load_spec(args.spec)
    if isinstance(spec, ModelSpec):
        if args.training:
            raise SpecError(f"{args.spec}: --training shows a layer's training graph; give a layer spec")
        graph = spec_graph(spec)
    else:
        graph = build_graph(spec, training=args.training)
    graph = run_pipeline(graph, _pipeline_for(args))
    render = {"text": to_text, "dot": to_dot, "json": to_json}[args.format]
    sys.stdout.write(render(graph))
    if args.format == "json":
        sys.stdout.write("\n")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from .passes import PASSES, PIPELINES

    if args.json:
        print(json.dumps({"passes": {n: c.summary for n, c in PASSES.items()},
                          "pipelines": {k: list(v) for k, v in PIPELINES.items()}}, indent=2))
        return 0
    for name, cls in PASSES.items():
        print(f"{name:24} {cls.summary}")
    print()
    for name, passes in PIPELINES.items():
        print(f"pipeline {name:15} {', '.join(passes) or '(nothing)'}")
    return 0


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _progress_printer(stream=None) -> Callable[[str, int, int], None]:
    """A backend's build progress callback (step, done, total): one line when a step starts and, for the
    weights, one per tenth written. Backends that do not report progress never call it."""
    shown: dict[str, int] = {}

    def report(step: str, done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        if step == "done" or shown.get(step) == tenth:
            return
        shown[step] = tenth
        out = stream or sys.stderr  # looked up per call: tests and callers may swap sys.stderr
        if step == "weights":
            print(f"  weights: {_human_size(done)} of {_human_size(total)} ({10 * tenth}%)", file=out, flush=True)
        else:
            print(f"  {step} ...", file=out, flush=True)

    return report


def spec_graph(spec, *, training: bool = False, decoder: bool = False, mla_cache: str = "expanded"):
    """The IR graph of a layer spec (x in, out) or a model spec (input_ids in, logits out); `training` adds
    the routing record, router logits, loads and balance losses; `decoder` gives a model's decode form (a KV
    cache in and out, `mla_cache` the MLA cache layout)."""
    from .builder import build_graph
    from .model_builder import GraphForm, build_model_graph
    from .model_spec import ModelSpec

    if isinstance(spec, ModelSpec):
        if decoder:
            return build_model_graph(spec, form=GraphForm.DECODE, mla_cache=mla_cache)
        return build_model_graph(spec, routing=training, training=training)
    if decoder:
        raise UsageError(f"--decoder builds a whole model's decode graph; {spec.name} is a layer spec")
    return build_graph(spec, training=training)


def prepare_for_backend(spec, backend, *, seed: int = 0, weights_path: str | None = None,
                        notes: list[str] | None = None, allow_narrowing: bool = False, decoder: bool = False,
                        mla_cache: str = "expanded", weights=None, quantization_errors: list | None = None):
    """(graph after the backend's pipeline, weights for it): what build lowers, for a layer or a model spec.
    `allow_narrowing`: the run asked for a lower precision than the weights file holds (`--precision`);
    `weights`: canonical weights already read (a checkpoint folder's) instead of a file or a seeded init.
    A quantized spec takes a file of quantized weights, or float ones which are quantized here; each
    quantized tensor's error against its float weight goes to `quantization_errors` (when the float
    weights are known)."""
    from .params import ensure_memory_for, init_weights, load_weights
    from .passes import run_pipeline

    training = backend.lowers_training_graph and not decoder
    full = spec_graph(spec, training=training, decoder=decoder, mla_cache=mla_cache)
    if weights is None:
        ensure_memory_for(full, f"loading {weights_path}" if weights_path else "initialising random weights")
    if getattr(spec, "quantization", None) is not None:
        from .quantization import load_quantized_weights, quantization_errors as errors_of, quantize_weights
        from .quantization import with_quantization

        float_graph = spec_graph(with_quantization(spec, None), training=training, decoder=decoder,
                                 mla_cache=mla_cache)
        if weights is not None:
            float_weights = weights
            weights = quantize_weights(full, float_weights)
        elif weights_path:
            weights, float_weights = load_quantized_weights(weights_path, full, float_graph, notes=notes)
        else:
            float_weights = init_weights(float_graph, seed)
            weights = quantize_weights(full, float_weights)
        if float_weights is not None and quantization_errors is not None:
            quantization_errors.extend(errors_of(full, float_weights, weights))
    elif weights is None:
        weights = (load_weights(weights_path, full, notes=notes, allow_narrowing=allow_narrowing) if weights_path
                   else init_weights(full, seed))
    graph = run_pipeline(full, backend.pipeline)
    return graph, {k: v for k, v in weights.items() if k in graph.weights}


# `build --precision` names -> spec dtypes
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quantized_spec(spec, option: str | None):
    """The spec with `--quantize FORMAT[:BLOCK][:asym]` applied (the routed and shared experts), or as it is."""
    if not option:
        return spec
    from .quantization import parse_quantize_option, with_quantization

    if spec.quantization is not None:
        raise UsageError(f"--quantize {option}: the spec already has a quantization section "
                         f"({spec.quantization.format.value}); drop one of the two")
    try:
        return with_quantization(spec, parse_quantize_option(option))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _cmd_build(args: argparse.Namespace) -> int:
    from .backends import backend_names, get_backend

    name, colon, variant = args.backend.partition(":")
    if name not in backend_names():
        raise UsageError(f"unknown backend '{args.backend}'; available: {', '.join(backend_names())}")
    backend = get_backend(name)
    if colon:  # validate's label `onnx:plugin` names the flavour as `--backend onnx --flavour plugin` does
        if "flavour" not in backend.build_options:
            raise UsageError(f"--backend {args.backend}: build takes the plain backend name '{name}' (variants "
                             f"are `onnx:<flavour>` only)")
        if args.flavour not in (None, variant):
            raise UsageError(f"--backend {args.backend} and --flavour {args.flavour} name different flavours")
        if variant not in ("portable", "ort", "plugin"):
            raise UsageError(f"--backend {args.backend}: unknown flavour '{variant}'; choose portable, ort or plugin")
        args.flavour = variant
    options = {k: v for k, v in {"flavour": args.flavour, "profile": args.profile, "precision": args.precision,
                                 "external_data": args.external_data or None,
                                 "int4_activations": args.int4_activations}.items() if v is not None}
    foreign = sorted(set(options) - backend.build_options)
    if foreign:  # checked before any weight is made: an option that does nothing is a mistake worth hearing about
        takes = ", ".join("--" + k.replace("_", "-") for k in sorted(backend.build_options)) or "no options"
        raise UsageError(f"backend '{backend.name}' does not take {', '.join('--' + k.replace('_', '-') for k in foreign)} "
                         f"(it takes {takes})")
    if "flavour" in options:  # the flavour decides what the backend can lower: ask the backend of that flavour
        backend = get_backend(f"{backend.name}:{options['flavour']}")
    if args.int4_activations and backend.label != "onnx:ort":
        raise UsageError(f"--int4-activations {args.int4_activations} is an option of the ort flavour (ONNX Runtime's "
                         f"QMoE and MatMulNBits); add --flavour ort")
    from .artifacts import check_output_folder

    check_output_folder(args.output)  # before any work: -o naming a file, under a file, or not writable
    if args.mla_cache is not None and not args.decoder:
        raise UsageError("--mla-cache chooses the cache layout of a decoder build; add --decoder")
    checkpoint = Path(args.spec) if Path(args.spec).is_dir() else None
    source_weights = None
    if checkpoint is not None:
        spec, source_weights, decoder_options = _checkpoint_source(checkpoint, args)
        if args.decoder and "special_tokens" in backend.build_options:
            options.update(decoder_options)
    else:
        spec = _load_spec(args.spec)
    if args.mla_cache is not None and getattr(getattr(spec, "model", None), "attention", None) is not None and \
            spec.model.attention.kind.value != "mla":
        raise UsageError(f"--mla-cache chooses an MLA model's cache layout; {spec.name} has "
                         f"{spec.model.attention.kind.value} attention")
    if args.precision is not None:
        # The precision is the network's types (TensorRT networks are strongly typed): the graph is built in that
        # dtype here, so the backend lowers the graph it is given and never rebuilds it from the spec.
        from .validate import with_dtype

        spec = with_dtype(spec, PRECISION_DTYPES[args.precision])
    spec = quantized_spec(spec, args.quantize)
    quantization = getattr(spec, "quantization", None)
    if args.int4_activations and (quantization is None or quantization.format.value not in ("int4", "int8")):
        raise UsageError(f"--int4-activations {args.int4_activations} needs int4 or int8 weights; add --quantize "
                         f"int4:32 (or int8), or drop the option")
    weight_notes: list[str] = []
    errors: list = []
    graph, weights = prepare_for_backend(spec, backend, seed=args.seed, weights_path=args.weights, notes=weight_notes,
                                         allow_narrowing=args.precision is not None, decoder=args.decoder,
                                         mla_cache=args.mla_cache or "expanded", weights=source_weights,
                                         quantization_errors=errors)
    for note in weight_notes:
        print(f"note: {note}", file=sys.stderr)
    if errors:
        from .quantization import error_table

        print(f"quantization error per tensor ({graph.meta.get('quantization', '')}):\n{error_table(errors)}",
              file=sys.stderr)
    ok, reason = backend.supports(graph)
    if not ok:
        raise BackendError(f"backend '{backend.name}' cannot build {args.spec}: {reason}")
    options["progress"] = _progress_printer()  # export/compile and weight writing take minutes on large layers
    out_dir = Path(args.output)
    print(f"building {spec.name} for {backend.name} ({backend.summary}) -> {out_dir}/", file=sys.stderr)
    start = time.perf_counter()
    result = backend.build(spec, graph, weights, out_dir, **options)
    elapsed = time.perf_counter() - start
    files = [{"path": str(p), "bytes": p.stat().st_size} for p in result.files]
    if args.json:
        print(json.dumps({"backend": backend.name, "files": files, "seconds": round(elapsed, 3),
                          "notes": result.notes}, indent=2))
    else:
        for f in files:
            print(f"wrote {f['path']} ({_human_size(f['bytes'])})")
        for note in result.notes:
            print(f"note: {note}")
        print(f"done in {elapsed:.1f} s")
    return 0


# A checkpoint's tokenizer files (what GenAI, through onnxruntime-extensions, and transformers read), copied
# into a decoder build when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def _checkpoint_source(folder: Path, args: argparse.Namespace):
    """(spec, weights, decoder build options) of a Hugging Face checkpoint folder given as build's SPEC: the
    special token ids and context length of its config.json and the tokenizer files beside it go into a
    decoder build (genai_config.json, copies)."""
    from .frontends.hf.checkpoint import load_hf_checkpoint

    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: a folder, but not a Hugging Face checkpoint (config.json + safetensors); give "
                         f"a spec YAML or a checkpoint folder")
    if args.weights or args.precision:
        raise UsageError(f"--weights and --precision go with a spec file; {folder} is a checkpoint folder, which "
                         f"brings its own weights and dtype")
    spec, weights = load_hf_checkpoint(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8")[: 1 << 20])
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}

    def token(key: str):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    context = config.get("max_position_embeddings")
    options = {"special_tokens": {k: token(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
               "tokenizer_files": [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]}
    if isinstance(context, int) and not isinstance(context, bool) and context > 0:
        options["context_length"] = context
    return spec, weights, options


def _cmd_backends(args: argparse.Namespace) -> int:
    """Support matrix: each backend against a spec (or just the list without one)."""
    from .backends import default_backend_labels, get_backend

    spec = _load_spec(args.spec) if args.spec else None
    rows = []
    for name in default_backend_labels():  # "onnx:portable", "onnx:ort", ...: support differs per variant
        try:
            backend = get_backend(name)
        except BackendError as err:
            rows.append({"backend": name, "available": False, "supported": False, "reason": str(err)})
            continue
        row = {"backend": name, "available": True, "summary": backend.summary}
        if spec is not None:
            try:
                # Support is a property of the lowered graph: no weights are made for this question.
                from .passes import run_pipeline

                ok, reason = backend.supports(run_pipeline(spec_graph(spec), backend.pipeline))
            except MoeIRError as err:
                ok, reason = False, str(err)
            row.update(supported=ok, reason=reason)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        status = ("yes" if r.get("supported") else "no") if spec is not None else ("available" if r["available"] else "missing")
        if not r["available"]:
            status = "missing"
        detail = r.get("reason") or r.get("summary", "")
        print(f"{r['backend']:18} {status:10} {detail}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Resolve the backend names (the registry's job) and run the validation harness on them."""
    from .backends import backend_names, default_backend_labels, resolve_backends
    from .builder import build_graph
    from .errors import WeightsError
    from .model_builder import build_model_graph
    from .model_spec import ModelSpec, miniature_model
    from .params import ensure_memory_for, load_weights
    from .spec import miniature
    from .validate import validate, validate_model, with_dtype

    if args.tokens < 1 or args.batch < 1:  # before the memory check, which would take the product as a size
        raise UsageError(f"--tokens and --batch must be at least 1, got tokens {args.tokens}, batch {args.batch}")
    spec = quantized_spec(_load_spec(args.spec), args.quantize)
    is_model = isinstance(spec, ModelSpec)
    if args.shrink is not None:
        if args.weights:
            raise SpecError("--shrink changes the weight shapes; it cannot be combined with --weights")
        if args.shrink < 2:
            raise SpecError(f"--shrink {args.shrink}: the hidden size must be at least 2")
        spec = miniature_model(spec, args.shrink) if is_model else miniature(spec, args.shrink)
    if args.backends is not None:
        labels = [b.strip() for item in args.backends for b in item.split(",") if b.strip()]
        if not labels:
            raise UsageError(f"--backends {' '.join(args.backends)!r} names no backend; available: "
                             f"{', '.join(backend_names())}")
    else:
        labels = default_backend_labels()
    unknown = [label for label in labels if label.partition(":")[0] not in backend_names()]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(repr(u) for u in unknown)}; available: "
                         f"{', '.join(backend_names())}")
    try:
        backends = resolve_backends(labels)  # bad variants fail here, before any weight is made
    except BackendError as err:  # a name the registry cannot read ("onnx:nope", "torch:"): the command line's fault
        raise UsageError(str(err)) from None
    if is_model:
        graph = build_model_graph(with_dtype(spec, args.dtype), routing=True)
    else:
        graph = build_graph(with_dtype(spec, args.dtype))
    try:
        # Each backend holds its own copy of the weights, plus the reference's float64 one; the reference
        # keeps every activation of the run.
        ensure_memory_for(graph, "validating", factor=3.0, batch=args.batch, tokens=args.tokens)
    except WeightsError as err:
        raise WeightsError(f"{err}; or check the routing at a smaller size with --shrink 64") from None
    notes: list[str] = []
    # --dtype asks for the run's precision, so a file in a wider dtype is cast to it (with a note).
    float_weights = None
    if spec.quantization is not None and args.weights:
        from .quantization import load_quantized_weights, with_quantization

        float_spec = with_dtype(with_quantization(spec, None), args.dtype)
        float_graph = build_model_graph(float_spec, routing=True) if is_model else build_graph(float_spec)
        weights, float_weights = load_quantized_weights(args.weights, graph, float_graph, notes=notes)
    else:
        weights = load_weights(args.weights, graph, notes=notes, allow_narrowing=True) if args.weights else None
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    report = (validate_model if is_model else validate)(
        spec, backends, tokens=args.tokens, batch=args.batch, dtype=args.dtype, seed=args.seed, weights=weights,
        strict_support=bool(args.backends), progress=lambda line: print(f"validate: {line}", file=sys.stderr, flush=True),
        **({"generate": args.generate, "mla_cache": args.mla_cache} if is_model else {}))
    if spec.quantization is not None:
        report.quantization = _quantization_accuracy(spec, args, graph, weights, float_weights)
    print(report.to_json() if args.json else report.to_table())
    return 0 if report.ok else 1


def _quantization_accuracy(spec, args: argparse.Namespace, graph, weights, float_weights):
    """The quantized spec against its float form on validate's input (the same seed and sizes), in the float64
    reference: None when the weights file held quantized weights only (no float model to compare with)."""
    import torch

    from .builder import build_graph
    from .model_builder import build_model_graph
    from .model_spec import ModelSpec
    from .params import init_weights
    from .quantization import accuracy_report, with_quantization
    from .validate import with_dtype

    if args.weights and float_weights is None:
        print("note: the weights file holds quantized weights; no float model to report the quantization against",
              file=sys.stderr)
        return None
    float_spec = with_dtype(with_quantization(spec, None), args.dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)  # validate's input
    if isinstance(spec, ModelSpec):
        float_graph = build_model_graph(float_spec, routing=True)
        inputs = {"input_ids": torch.randint(0, spec.model.vocab_size, (args.batch, args.tokens), generator=gen)}
    else:
        float_graph = build_graph(float_spec)
        inputs = {"x": torch.randn(args.batch, args.tokens, spec.hidden, generator=gen, dtype=torch.float64)}
    if float_weights is None:
        float_weights = init_weights(float_graph, args.seed)
    if weights is None:
        weights = init_weights(graph, args.seed)
    return accuracy_report(float_graph, float_weights, graph, weights, inputs)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Generation is its own module of the CLI layer (it reads checkpoints and tokenizers), loaded on use."""
    from .cli_generate import run_generate

    return run_generate(args)


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]; argparse turns the ValueError into a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text) if len(text) <= 30 else None
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer from {low:,} to {high:,}, found {text[:40]!r}")
        return value

    parse.__name__ = "integer"
    return parse


# Bounds of command-line numbers: a seed torch's generators take (< 2**63), and a context far above any
# model's.
MAX_SEED = 2**63 - 1
MAX_CONTEXT = 1_000_000_000


# validate's dtypes, stated here so that `moe-ir --help` need not import the harness (and torch);
# tests/test_cli.py checks they are validate.TOLERANCES' keys.
VALIDATE_DTYPES = ("float64", "float32", "float16", "bfloat16")
QUANTIZE_HELP = ("block-quantize the routed and shared experts: int8, int4 or fp8_e4m3, then the block size (default "
                 "32; fp8: 128) and :asym for zero points, e.g. int4:32 (a spec's `quantization:` section chooses "
                 "other weights)")


def build_parser() -> argparse.ArgumentParser:
    from . import spec as spec_limits

    parser = argparse.ArgumentParser(prog="moe-ir", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="parameters, FLOPs, expert combinations and both parametrisations")
    p.add_argument("spec")
    p.add_argument("--context", type=int_in(0, MAX_CONTEXT), metavar="L",
                   help="model specs: add attention-score FLOPs for a token attending to L positions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("graph", help="print the IR graph (after a pipeline) as text, DOT or JSON")
    p.add_argument("spec")
    p.add_argument("--format", choices=("text", "dot", "json"), default="text")
    p.add_argument("--pipeline", default="none", metavar="NAME",
                   help="named pipeline to run first (`moe-ir passes` lists them; default: none)")
    p.add_argument("--passes", help="comma-separated passes to run instead of --pipeline")
    p.add_argument("--after", metavar="PASS", help="stop after this pass of the pipeline (dump that stage)")
    p.add_argument("--training", action="store_true", help="the training graph (losses, router logits, loads)")
    p.set_defaults(func=_cmd_graph)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec")
    p.set_defaults(func=_cmd_schema)

    p = sub.add_parser("passes", help="list passes and named pipelines")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_passes)

    from .backends import backend_names

    p = sub.add_parser("backends", help="list backends; with a spec, which support it and why not")
    p.add_argument("spec", nargs="?")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("build", help="lower a spec to a backend's artifact",
                       description=f"backends: {', '.join(backend_names())}")
    p.add_argument("spec")
    p.add_argument("--backend", required=True, metavar="NAME",
                   help=f"one of: {', '.join(backend_names())} (onnx:<flavour> is --backend onnx --flavour <flavour>)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--weights", metavar="FILE", help="safetensors weights (default: seeded random init)")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the random init (default 0)")
    p.add_argument("--flavour", choices=("portable", "ort", "plugin"), help="ONNX flavour (onnx backend)")
    p.add_argument("--quantize", metavar="FORMAT[:BLOCK]", help=QUANTIZE_HELP)
    p.add_argument("--profile", metavar="MIN,OPT,MAX", help="token-count optimisation profile (tensorrt)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="network precision (tensorrt)")
    p.add_argument("--external-data", action="store_true", help="ONNX weights in a .data file beside the model")
    p.add_argument("--int4-activations", choices=("int8",),
                   help="onnx --flavour ort with --quantize int4/int8: the quantized experts (QMoE) and projections "
                        "(MatMulNBits) compute on int8 activations (accuracy_level 4): faster, about 1e-2 relative "
                        "error; default: exact float32 activations")
    p.add_argument("--decoder", action="store_true",
                   help="build the model's decode graph (a KV cache in and out, for generation); with --backend onnx "
                        "a deployable decoder folder: model.onnx, genai_config.json for onnxruntime-genai where it "
                        "can run the model, and the tokenizer files of a checkpoint folder SPEC")
    p.add_argument("--mla-cache", choices=("expanded", "latent"),
                   help="with --decoder: what an MLA model caches (default expanded: per-head K/V; latent: c_kv and "
                        "the shared rotary key)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("validate", help="run backends on the same weights and input; compare with the reference",
                       description="A layer spec is fed random activations and its output and routing are "
                                   "compared; a model spec (model: + moe:) is fed random token ids and its "
                                   "logits and every MoE layer's routing are compared. Exit 1 on any mismatch "
                                   "beyond the per-dtype tolerance, 0 otherwise.")
    p.add_argument("spec")
    p.add_argument("--backends", nargs="+", metavar="NAME",
                   help="backends, a variant after a colon (onnx:portable|ort|plugin); default: every registered "
                        "backend and its default variants")
    # Any size parses; below 1 is refused by the harness, above what fits by the memory check (with sizes).
    p.add_argument("--tokens", type=int, default=16, help="tokens per sequence (default 16)")
    p.add_argument("--quantize", metavar="FORMAT[:BLOCK]", help=QUANTIZE_HELP + "; the report adds the quantized "
                   "model against the float one")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--dtype", default="float32", choices=VALIDATE_DTYPES)
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    p.add_argument("--weights", metavar="FILE", help="safetensors weights (default: seeded random init)")
    p.add_argument("--shrink", type=int_in(2, spec_limits.MAX_HIDDEN), metavar="HIDDEN",
                   help="validate the same layer at hidden size HIDDEN (expert counts, top-k, routing, balance and "
                        "capacity kept; widths scaled): for published layers too large for this machine; a model "
                        "also keeps its attention kind and dense/MoE schedule at 2-3 layers (model_spec.miniature_model)")
    p.add_argument("--generate", type=int, default=4, metavar="N",
                   help="model specs: also check generation through every backend that runs decode graphs: decode "
                        "steps equal prefill at every position, and N greedy tokens (2 prompts, one left-padded) "
                        "equal the reference's (default 4; 0: off)")
    p.add_argument("--mla-cache", nargs="+", choices=("expanded", "latent"), default=["expanded", "latent"],
                   help="MLA models: the cache layouts the generation check builds (default: both)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("generate", help="generate tokens from a model spec, a built torch folder or a Hugging Face "
                                        "checkpoint folder",
                       description="SOURCE: a model spec YAML (seeded random weights, or --weights), a folder "
                                   "`moe-ir build --backend torch` wrote, a decoder folder `moe-ir build --backend onnx "
                                   "--decoder` wrote, or a Hugging Face checkpoint folder "
                                   "(config.json + safetensors). Greedy unless --temperature/--top-k/--top-p. One "
                                   "prompt streams its tokens to stdout as they come; a batch prints one line per "
                                   "prompt at the end. Prefill and decode tokens/s go to stderr.")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("--backend", default="torch", metavar="NAME",
                   help="any backend that runs decode graphs: torch (default), compile, aoti, reference, "
                        "onnx:portable, onnx:ort; onnx:<flavour> and genai also run a folder `build --backend onnx "
                        "--decoder` wrote (genai: that folder only)")
    p.add_argument("--weights", metavar="FILE", help="safetensors weights of a spec file (default: seeded random)")
    p.add_argument("--quantize", metavar="FORMAT[:BLOCK]", help=QUANTIZE_HELP)
    p.add_argument("--int4-activations", choices=("bf16", "fused", "int8"),
                   help="torch backend, int4 weights: decode steps run torch's int4 matmul on bfloat16 activations "
                        "(bf16: block 32..256, about 3e-3 relative error per matmul), or a fused float32 kernel "
                        "compiled on first use (fused: exact, needs a C++ compiler); onnx:ort, int4/int8 weights: "
                        "ONNX Runtime's QMoE and MatMulNBits on int8 activations (int8: about 1e-2 relative); "
                        "default: exact")
    p.add_argument("--prompt-ids", metavar="IDS", help='token ids of one prompt, e.g. "1 2 3"')
    p.add_argument("--prompt-file", metavar="FILE", help="one prompt of token ids a line: a batch, left-padded")
    p.add_argument("--prompt", metavar="TEXT", help="text, with the source folder's tokenizer.json")
    p.add_argument("--max-new-tokens", type=int_in(1, MAX_CONTEXT), default=16, metavar="N", help="default 16")
    p.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (> 0)")
    p.add_argument("--top-k", type=int_in(1, MAX_CONTEXT), metavar="K", help="sample among the K likeliest tokens")
    p.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of probability >= P")
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=0, help="seed of the sampler (default 0)")
    p.add_argument("--eos-token-id", type=int_in(0, MAX_CONTEXT), metavar="ID",
                   help="stop a sequence at this token (default: the checkpoint's eos_token_id, if any)")
    p.add_argument("--weights-seed", type=int_in(0, MAX_SEED), default=0, metavar="S",
                   help="a spec without --weights: seed of its random weights, as `build --seed` (default 0)")
    p.add_argument("--shrink", type=int_in(2, spec_limits.MAX_HIDDEN), metavar="HIDDEN",
                   help="a spec without --weights: its miniature at this hidden size (as validate --shrink)")
    p.add_argument("--dtype", choices=VALIDATE_DTYPES, help="run in this dtype (default: the model's)")
    p.add_argument("--mla-cache", choices=("expanded", "latent"),
                   help="MLA models: the cache layout (default expanded)")
    p.add_argument("--json", action="store_true", help="print {tokens, prefill_tokens_per_s, decode_tokens_per_s, "
                                                       "text} at the end instead of streaming")
    p.set_defaults(func=_cmd_generate)

    for module_name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        add: Callable | None = getattr(module, "add_command", None)
        if add is not None:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The one error boundary of the command line: whatever fails, the user reads one line on stderr and
    the exit code says what kind of failure it was (README, "Errors"): a MoeIRError exits with its own code
    (2: bad spec or usage, 1: other), argparse's usage errors with 2, anything else is a bug of moe-ir and
    exits 1 as an "internal error"; Ctrl-C exits 130. `--debug` (anywhere on the line) shows the traceback.
    Parser construction is inside the boundary too: it imports the command modules, and a Ctrl-C there
    is still a Ctrl-C."""
    if signal.getsignal(signal.SIGINT) is _exit_quietly_on_interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on the boundary below answers
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        # --debug is accepted after the sub-command too; the global option is the one argparse knows.
        args = parser.parse_args((["--debug"] if debug else []) + [a for a in argv if a != "--debug"])
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("moe-ir: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`moe-ir schema | head`): not an error of ours. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # noqa: BLE001 - the boundary: nothing escapes as a traceback
        if debug:
            raise
        print(f"moe-ir: {describe_failure(err)}", file=sys.stderr)
        return err.exit_code if isinstance(err, MoeIRError) else 1


def describe_failure(err: BaseException) -> str:
    """One line for any exception: a MoeIRError's own message, a system error (disk full, permission) as
    the system states it, a memory shortage as such, anything else as an internal error of moe-ir."""
    if isinstance(err, MoeIRError):  # its first line: an IRError goes on with the printed graph
        return "error: " + " ".join(str(err).split("\n")[0].split())
    if isinstance(err, MemoryError):
        return "error: out of memory (the machine could not allocate what the command needs; try a smaller spec " \
               "or fewer tokens)"
    if isinstance(err, OSError):
        return "error: " + " ".join(str(err).split())
    return " ".join(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)".split())


if __name__ == "__main__":
    sys.exit(main())
