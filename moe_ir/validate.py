"""Cross-validation: the same weights and input through backends, each compared with the reference.

`validate(spec, backends)` builds the graph, initialises seeded weights (unless given), draws a seeded
input, runs the reference interpreter in float64 (the oracle) and every backend on its own pipeline,
and compares:
  * outputs `out` and `weights` (weights aligned by expert id, so a different order of equal-score
    experts is not an error): max abs error and max relative error, where relative means
    abs error / max(1, max |reference|). A value passes when
        |got - ref| <= atol * max(1, max |ref|) + rtol * |ref|
    with (atol, rtol) from TOLERANCES for the dtype (the one place tolerances are stated);
  * routing: the chosen experts per token as sets (token choice), or the tokens per expert as sets
    (expert choice). Every flip is reported with its score margin in the reference: the gap between
    the k-th and (k+1)-th selection score (score + bias) at that token (or, for expert choice, the gap
    between the C-th and (C+1)-th token score of that expert). A flip whose margin is below
    NEAR_TIE[dtype] is a near-tie: the backend may legitimately pick either expert, so the affected
    tokens are left out of the output comparison (the report counts them). A flip with a larger margin
    is a mismatch.

Unsupported backends: a backend whose supports() says no gets a "skipped" row with the reason. That is
not a failure when the backend list was the default (every backend, every ONNX flavour); when the
caller named the backends (`strict_support=True`, which the CLI sets for `--backends`), a named backend
that cannot run the spec fails the run, since the user asked for that target specifically.

Generation (`validate_generation`, and `validate_model(..., generate=N)`): each backend is prepared on the
model's decode graph (moe_ir.model_builder, form decode); its runner then takes the graph's inputs by name
and returns its outputs by name. Decode steps are compared with the reference prefill at every position
(routing near-ties as above) and greedy tokens with the reference's; a token that differs where the
reference's top-2 logit gap is under twice the dtype's tolerance is a near-tie, reported with its margin.

The harness receives backend objects (anything with `label`, `pipeline`, `supports` and `prepare`); it
knows no target by name. Turning command-line names such as "onnx:ort" into backends is the registry's
job (moe_ir.backends.registry); the `moe-ir validate` command (moe_ir/cli.py) joins the two.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from .errors import BackendError, BackendUnavailable, MoeIRError, SpecError
from .model_spec import ModelSpec
from .spec import DType, LayerSpec

Progress = Callable[[str], None]  # one line of progress (the CLI prints it on stderr)

# (atol, rtol) per dtype; atol is scaled by max(1, max |reference|) of the output compared.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "float16": (1e-2, 1e-2),
    "bfloat16": (2e-2, 2e-2),
}
# A routing flip whose reference score margin is below this is a near-tie, not an error.
NEAR_TIE: dict[str, float] = {"float64": 1e-9, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1e-2}



class CheckedBackend(Protocol):
    """What the harness needs of a backend (moe_ir.backends.base.Backend has it)."""

    label: str
    pipeline: Sequence[str]

    def supports(self, graph: Any) -> tuple[bool, str]: ...

    def prepare(self, graph: Any, weights: Mapping[str, torch.Tensor], **options: Any) -> Callable: ...


COMPARED_OUTPUTS = ("out", "weights")


@dataclass
class OutputError:
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RoutingCheck:
    units: int                       # tokens (token choice) or experts (expert choice) compared
    flips: int = 0
    near_ties: int = 0               # flips under the near-tie margin
    excluded_tokens: int = 0         # tokens left out of the output comparison because of near-ties
    margins: list[float] = field(default_factory=list)  # reference margin of each flip (first 20)

    @property
    def ok(self) -> bool:
        return self.flips == self.near_ties

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ok": self.ok}


class RowOutcome:
    """A report row's verdict: "ok" passes, a skip passes unless the caller named the backend (`required`)."""

    status: str
    required: bool

    @property
    def ok(self) -> bool:
        if self.status == "skipped":
            return not self.required
        return self.status == "ok"


@dataclass
class BackendResult(RowOutcome):
    backend: str
    status: str                      # "ok" | "mismatch" | "skipped" | "error"
    reason: str = ""
    outputs: dict[str, OutputError] = field(default_factory=dict)
    routing: RoutingCheck | None = None
    seconds: float = 0.0
    required: bool = False           # a skip counts as a failure (the caller named this backend)

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status, "ok": self.ok, "reason": self.reason,
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
                "routing": self.routing.to_dict() if self.routing else None, "seconds": round(self.seconds, 3)}


@dataclass
class ValidationReport:
    spec: str
    tokens: int
    batch: int
    dtype: str
    seed: int
    results: list[BackendResult]
    primary: str = "out"             # the output the table shows first: `out` (layers) or `logits` (models)
    generation: list["GenerationReport"] = field(default_factory=list)  # models validated with generate > 0
    # a quantized spec: what quantization costs against the float model (moe_ir.quantization.QuantizationAccuracy)
    quantization: Any = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and all(g.ok for g in self.generation)

    def to_json(self) -> str:
        return json.dumps({"spec": self.spec, "tokens": self.tokens, "batch": self.batch, "dtype": self.dtype,
                           "seed": self.seed, "ok": self.ok, "tolerance": dict(zip(("atol", "rtol"),
                                                                                 TOLERANCES[self.dtype])),
                           "results": [r.to_dict() for r in self.results],
                           "generation": [g.to_dict() for g in self.generation],
                           **({"quantization": self.quantization.to_dict()} if self.quantization is not None else {})},
                          indent=2)

    def to_table(self) -> str:
        atol, rtol = TOLERANCES[self.dtype]
        head = (f"validate {self.spec}: {self.batch}x{self.tokens} tokens, {self.dtype}, seed {self.seed}; "
                f"oracle: reference interpreter (float64); tolerance atol {atol:g}*max(1,|ref|) + rtol {rtol:g}*|ref|")
        cols = ("backend", "status", f"{self.primary} abs", f"{self.primary} rel", "weights abs", "routing", "time", "note")
        rows = []
        for r in self.results:
            def err(key: str, attr: str) -> str:
                e = r.outputs.get(key)
                return f"{getattr(e, attr):.2e}" if e is not None else "-"

            routing = "-"
            if r.routing is not None:
                rc = r.routing
                routing = f"{rc.units - rc.flips}/{rc.units} agree"  # units: tokens x MoE layers for models
                if rc.flips:
                    routing += f", {rc.flips} flip(s) (near-tie {rc.near_ties}, min margin {min(rc.margins):.1e})"
            status = r.status if r.ok or r.status != "skipped" else "FAILED (skipped)"
            if r.status in ("mismatch", "error"):
                status = r.status.upper()
            note = r.reason
            if r.routing is not None and r.routing.excluded_tokens:
                note = (note + "; " if note else "") + f"{r.routing.excluded_tokens} near-tie token(s) excluded"
            rows.append((r.backend, status, err(self.primary, "max_abs"), err(self.primary, "max_rel"), err("weights", "max_abs"),
                         routing, f"{r.seconds:.1f}s" if r.status not in ("skipped",) else "-", note))
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
        widths[-1] = 0
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
        for row in rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for g in self.generation:
            lines.append(g.to_table())
        if self.quantization is not None:
            lines.append(self.quantization.to_table())
        lines.append("OK" if self.ok else "FAILED: mismatch beyond tolerance (or a named backend could not run)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------


def validate(spec: LayerSpec, backends: Sequence[CheckedBackend], *, tokens: int = 16, batch: int = 1,
             dtype: str = "float32", seed: int = 0, weights: Mapping[str, torch.Tensor] | None = None,
             strict_support: bool = False, progress: Progress | None = None) -> ValidationReport:
    """Run every backend on one seeded input and compare with the float64 reference (module docstring).
    `progress(line)` hears when each backend starts and how it ended (the CLI prints it on stderr)."""
    from .builder import build_graph
    from .interpreter import interpret
    from .params import init_weights

    _check_run(dtype, tokens, batch)
    spec = with_dtype(spec, dtype)
    graph = build_graph(spec)
    if weights is None:
        weights = init_weights(graph, seed)
    torch_dtype = DType(dtype).torch
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, tokens, spec.hidden, generator=gen, dtype=torch.float64).to(torch_dtype)
    env = interpret(graph, {"x": x}, weights, dtype=torch.float64, keep_all=True)
    ref = {key: env[v.name] for key, v in graph.outputs.items()}
    margins = _reference_margins(graph, env)
    results = _run_backends(backends, lambda: build_graph(spec), weights, x,
                            lambda label, got: _compare(label, got, ref, margins, dtype), strict_support, progress)
    return ValidationReport(spec.name, tokens, batch, dtype, seed, results)


def with_dtype(spec: LayerSpec | ModelSpec, dtype: str) -> LayerSpec | ModelSpec:
    """The spec validated in `dtype`: a layer's dtype, or a model's (its model section and its MoE layers')."""
    if isinstance(spec, ModelSpec):
        return dataclasses.replace(spec, model=dataclasses.replace(spec.model, dtype=DType(dtype)),
                                   moe=dataclasses.replace(spec.moe, dtype=DType(dtype)))
    return dataclasses.replace(spec, dtype=DType(dtype))


def _check_run(dtype: str, tokens: int, batch: int) -> None:
    if dtype not in TOLERANCES:
        raise BackendError(f"dtype '{dtype}' has no tolerance; choose one of {', '.join(TOLERANCES)}")
    if tokens < 1 or batch < 1:  # an empty input compares nothing; torch would fail deep in the comparison
        raise SpecError(f"--tokens and --batch must be at least 1, got tokens {tokens}, batch {batch}")


def _run_backends(backends: Sequence[CheckedBackend], fresh_graph: Callable[[], Any], weights: Mapping[str, torch.Tensor],
                  inputs: torch.Tensor, compare: Callable[[str, Mapping[str, torch.Tensor]], BackendResult],
                  strict_support: bool, progress: Progress | None = None) -> list[BackendResult]:
    """Each backend on its own pipeline over a fresh graph, run on `inputs`, compared by `compare`."""
    from .passes import run_pipeline

    results: list[BackendResult] = []

    def report(result: BackendResult) -> None:
        results.append(result)
        if progress is not None:
            progress(f"{result.backend}: {result.status} in {result.seconds:.1f}s")

    for i, backend in enumerate(backends):
        label = backend.label
        if progress is not None:  # a compile or an export of a large graph takes minutes: say what runs
            progress(f"{label}: running ({i + 1}/{len(backends)})")
        start = time.perf_counter()
        try:
            piped = run_pipeline(fresh_graph(), backend.pipeline)
            ok, reason = backend.supports(piped)
            if not ok:
                report(BackendResult(label, "skipped", reason, required=strict_support))
                continue
            runner = backend.prepare(piped, {k: v for k, v in weights.items() if k in piped.weights})
            # Compared inside the try: outputs of the wrong shape or kind are this backend's error too.
            result = compare(label, runner(inputs))
        except MoeIRError as err:
            skipped = isinstance(err, BackendUnavailable)
            report(BackendResult(label, "skipped" if skipped else "error", str(err).splitlines()[0],
                                 required=strict_support or not skipped, seconds=time.perf_counter() - start))
            continue
        except Exception as err:  # noqa: BLE001 - a backend's own failure is its row, never the end of the run
            # (a compiler's internal error, a runtime's exception): the other backends still run and report.
            first = (str(err).splitlines() or [""])[0][:300]
            report(BackendResult(label, "error", f"{type(err).__name__}: {first}", required=True,
                                 seconds=time.perf_counter() - start))
            continue
        result.seconds = time.perf_counter() - start
        report(result)
    return results


def _selection_margin(select: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of `select`, the gap between its k-th and (k+1)-th largest value (inf when nothing is left out)."""
    top = select.topk(min(k + 1, select.shape[1]), dim=-1).values
    return (top[:, k - 1] - top[:, k]) if top.shape[1] > k else torch.full_like(top[:, 0], float("inf"))


def _topk_selection(node, env) -> torch.Tensor:
    """The scores a TOPK_ROUTE node selects on (score + bias); a SPARSEMIXER_ROUTE node's logits."""
    select = env[node.inputs[0].name]
    return select if len(node.inputs) < 2 or node.inputs[1] is None else select + env[node.inputs[1].name]


def _reference_margins(graph, env) -> dict[str, torch.Tensor]:
    """Per token (or expert) gap between the last selected and the first unselected selection score."""
    from .ir import OpCode

    out = {}
    for node in graph.nodes:
        if node.op in (OpCode.TOPK_ROUTE, OpCode.SPARSEMIXER_ROUTE):
            out["token"] = _selection_margin(_topk_selection(node, env), node.attrs["k"])
        if node.op == OpCode.EXPERT_CHOICE_ROUTE:
            out["expert"] = _selection_margin(env[node.inputs[0].name].t(), int(env[node.outputs[2].name][0]))
    return out


def _compare(label: str, got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
             margins: Mapping[str, torch.Tensor], dtype: str) -> BackendResult:
    near = NEAR_TIE[dtype]
    result = BackendResult(label, "ok")
    if "out" not in got:
        return BackendResult(label, "error", "runner returned no 'out'")
    hidden = ref["out"].shape[-1]
    token_ok = torch.ones(ref["out"].numel() // hidden, dtype=torch.bool)
    bad_flip = False
    if "expert_idx" in ref and "expert_idx" in got:
        r_idx, g_idx = ref["expert_idx"], got["expert_idx"].to(torch.int64).reshape(ref["expert_idx"].shape)
        differs = (r_idx.sort(dim=-1).values != g_idx.sort(dim=-1).values).any(dim=-1)
        check = RoutingCheck(units=r_idx.shape[0])
        for t in differs.nonzero().flatten().tolist():
            m = float(margins["token"][t])
            check.flips += 1
            check.margins.append(m) if len(check.margins) < 20 else None
            if m < near:
                check.near_ties += 1
                token_ok[t] = False
            else:
                bad_flip = True
        check.excluded_tokens = int((~token_ok).sum())
        result.routing = check
    elif "rows" in ref and "rows" in got:
        n_exp = margins["expert"].shape[0]
        r_rows, g_rows = ref["rows"].view(n_exp, -1), got["rows"].to(torch.int64).view(n_exp, -1)
        check = RoutingCheck(units=n_exp)
        for e in range(n_exp):
            a, b = set(r_rows[e].tolist()), set(g_rows[e].tolist())
            if a != b:
                m = float(margins["expert"][e])
                check.flips += 1
                check.margins.append(m) if len(check.margins) < 20 else None
                if m < near:
                    check.near_ties += 1
                    token_ok[list(a ^ b)] = False
                else:
                    bad_flip = True
        check.excluded_tokens = int((~token_ok).sum())
        result.routing = check
    for key in COMPARED_OUTPUTS:
        if key not in ref or key not in got:
            continue
        if key == "weights" and "expert_idx" in got:
            r, g = _weights_by_expert(ref["weights"], got["weights"], ref["expert_idx"], got["expert_idx"])
        else:
            r, g = ref[key], got[key]
        result.outputs[key] = _output_error(r, g, token_ok, dtype)
    if bad_flip or not all(e.ok for e in result.outputs.values()):
        result.status = "mismatch"
        if bad_flip:
            result.reason = "routing differs beyond near-ties"
    return result


def _weights_by_expert(ref_w, got_w, ref_idx, got_idx) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights reordered by expert id: equal-score experts may come in either order."""
    got_idx = got_idx.to(torch.int64).reshape(ref_idx.shape)
    return (ref_w.gather(-1, ref_idx.argsort(dim=-1)),
            got_w.reshape(ref_w.shape).to(ref_w.dtype).gather(-1, got_idx.argsort(dim=-1)))


def _output_error(ref: torch.Tensor, got: torch.Tensor, token_ok: torch.Tensor, dtype: str) -> OutputError:
    """The TOLERANCES check of one output on the tokens still compared (rows of token_ok)."""
    atol, rtol = TOLERANCES[dtype]
    r, g = ref.double(), got.double().reshape(ref.shape)
    rows_r, rows_g = r.reshape(token_ok.shape[0], -1)[token_ok], g.reshape(token_ok.shape[0], -1)[token_ok]
    diff = (rows_g - rows_r).abs()
    scale = max(1.0, float(rows_r.abs().max())) if rows_r.numel() else 1.0
    finite = bool(torch.isfinite(rows_g).all())
    within = finite and bool((diff <= atol * scale + rtol * rows_r.abs()).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    return OutputError(max_abs, max_abs / scale, atol, rtol, within)


# ------------------------------------------------------------------------------------------------
# whole models


def _model_margins(graph, env) -> dict[str, torch.Tensor]:
    """Selection margin per token for every `layers.{i}.expert_idx` output of a model graph."""
    from .ir import OpCode

    out = {}
    for key, value in graph.outputs.items():
        node = value.producer
        if key.endswith("expert_idx") and node is not None and node.op in (OpCode.TOPK_ROUTE,
                                                                            OpCode.SPARSEMIXER_ROUTE):
            out[key] = _selection_margin(_topk_selection(node, env), node.attrs["k"])
    return out


def _layer_index(key: str) -> int:
    return int(key.split(".")[1])


def _compare_model(label: str, got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                   margins: Mapping[str, torch.Tensor], dtype: str, seq_len: int) -> BackendResult:
    """Logits and every MoE layer's routing of a whole model, against the reference.

    A near-tie flip at token t of a sequence changes that token's hidden state and, through causal
    attention, those of every later token of the sequence in later layers; so positions t.. of that
    sequence are left out of the comparisons that follow (later layers' routing and the logits)."""
    near = NEAR_TIE[dtype]
    result = BackendResult(label, "ok")
    missing = [key for key in ref if key not in got]
    if missing:
        return BackendResult(label, "error", f"runner returned no {', '.join(missing[:3])}")
    token_ok = torch.ones(ref["logits"].numel() // ref["logits"].shape[-1], dtype=torch.bool)
    check = RoutingCheck(units=0)
    bad_flip = False
    weight_errors = []
    for key in sorted(margins, key=_layer_index):
        r_idx = ref[key]
        g_idx = got[key].to(torch.int64).reshape(r_idx.shape)
        compared = token_ok.clone()
        check.units += int(compared.sum())
        differs = (r_idx.sort(dim=-1).values != g_idx.sort(dim=-1).values).any(dim=-1) & compared
        for t in differs.nonzero().flatten().tolist():
            m = float(margins[key][t])
            check.flips += 1
            if len(check.margins) < 20:
                check.margins.append(m)
            if m < near:
                check.near_ties += 1
                token_ok[t:(t // seq_len + 1) * seq_len] = False  # t and the rest of its sequence
            else:
                bad_flip = True
        w_key = key.removesuffix("expert_idx") + "weights"
        if w_key in ref:
            r_w, g_w = _weights_by_expert(ref[w_key], got[w_key], r_idx, g_idx)
            weight_errors.append(_output_error(r_w, g_w, compared & ~differs, dtype))
    check.excluded_tokens = int((~token_ok).sum())
    result.routing = check if margins else None
    result.outputs["logits"] = _output_error(ref["logits"], got["logits"], token_ok, dtype)
    if weight_errors:  # the worst layer stands for all
        worst = max(weight_errors, key=lambda e: (not e.ok, e.max_rel))
        result.outputs["weights"] = worst
    if bad_flip or not all(e.ok for e in result.outputs.values()):
        result.status = "mismatch"
        if bad_flip:
            result.reason = "routing differs beyond near-ties"
    return result


def validate_model(spec: ModelSpec, backends: Sequence[CheckedBackend], *, tokens: int = 16, batch: int = 1,
                   dtype: str = "float32", seed: int = 0, weights: Mapping[str, torch.Tensor] | None = None,
                   strict_support: bool = False, progress: Progress | None = None, generate: int = 0,
                   mla_cache: Sequence[str] = ("expanded", "latent")) -> ValidationReport:
    """`validate` for a whole model: seeded token ids in, logits and every MoE layer's routing compared.
    With `generate` N > 0, also `validate_generation` with N new tokens (the report's `generation`), once
    per MLA cache layout in `mla_cache` for an MLA model, once for any other. A backend that runs no decode
    graph is listed as skipped there with its reason, never a failure: generation is checked where it exists."""
    from .interpreter import interpret
    from .model_builder import build_model_graph
    from .params import init_weights

    _check_run(dtype, tokens, batch)
    spec = with_dtype(spec, dtype)
    graph = build_model_graph(spec, routing=True)
    if weights is None:
        weights = init_weights(graph, seed)
    ids = torch.randint(0, spec.model.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed + 1))
    env = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64, keep_all=True)
    ref = {key: env[v.name] for key, v in graph.outputs.items()}
    margins = _model_margins(graph, env)
    results = _run_backends(backends, lambda: build_model_graph(spec, routing=True), weights, ids,
                            lambda label, got: _compare_model(label, got, ref, margins, dtype, tokens), strict_support,
                            progress)
    report = ValidationReport(spec.name, tokens, batch, dtype, seed, results, primary="logits")
    if generate > 0:
        layouts = list(mla_cache) if spec.model.attention.kind.value == "mla" else ["expanded"]
        report.generation = [validate_generation(spec, backends, new_tokens=generate, dtype=dtype, seed=seed,
                                                 weights=weights, mla_cache=layout, progress=progress)
                             for layout in layouts]
    return report


# ------------------------------------------------------------------------------------------------
# generation: decode graphs (moe_ir.generation)


@dataclass
class GenerationResult(RowOutcome):
    """One backend's generation check: its decode-step logits (and routing) at every position against the
    reference prefill, and its greedy tokens against the reference's."""
    backend: str
    status: str                      # "ok" | "mismatch" | "skipped" | "error"
    reason: str = ""
    decode: BackendResult | None = None  # decode steps vs prefill, compared as validate_model compares logits
    tokens: int = 0                  # greedy tokens compared (up to each row's first difference)
    agree: int = 0                   # of those, equal to the reference's
    near_ties: list[dict[str, Any]] = field(default_factory=list)  # differences at a near-tie: row, step, margin
    seconds: float = 0.0
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": self.status, "ok": self.ok, "reason": self.reason,
                "decode": self.decode.to_dict() if self.decode else None, "tokens": self.tokens, "agree": self.agree,
                "near_ties": self.near_ties, "seconds": round(self.seconds, 3)}


@dataclass
class GenerationReport:
    prompt: int                      # prompt length (tokens) of the greedy run and of the decode check's prefill
    new_tokens: int
    batch: int
    mla_cache: str
    results: list[GenerationResult]
    note: str = ""                   # what was not checked, and why

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "new_tokens": self.new_tokens, "batch": self.batch, "mla_cache": self.mla_cache,
                "ok": self.ok, "note": self.note, "results": [r.to_dict() for r in self.results]}

    def to_table(self) -> str:
        head = (f"generation: {self.batch} prompt(s) of {self.prompt} tokens (row r left-padded by r), "
                f"{self.new_tokens} greedy tokens; decode steps vs the reference prefill at every position"
                + (f"; MLA cache {self.mla_cache}" if self.mla_cache else ""))
        cols = ("backend", "status", "decode logits abs", "decode routing", "greedy tokens", "time", "note")
        rows = []
        for r in self.results:
            d = r.decode
            err = f"{d.outputs['logits'].max_abs:.2e}" if d is not None and "logits" in d.outputs else "-"
            routing = "-"
            if d is not None and d.routing is not None:
                routing = f"{d.routing.units - d.routing.flips}/{d.routing.units} agree"
                if d.routing.flips:
                    routing += f", {d.routing.flips} flip(s) (near-tie {d.routing.near_ties})"
            tokens = f"{r.agree}/{r.tokens} equal" if r.status not in ("skipped", "error") else "-"
            if r.near_ties:
                tokens += ", near-tie " + ", ".join(f"row {t['row']} step {t['step']} margin {t['margin']:.1e}"
                                                    for t in r.near_ties[:3])
            status = r.status.upper() if r.status in ("mismatch", "error") else r.status
            if r.status == "skipped" and not r.ok:
                status = "FAILED (skipped)"
            rows.append((r.backend, status, err, routing, tokens, f"{r.seconds:.1f}s" if r.status != "skipped" else "-",
                         r.reason))
        widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
        widths[-1] = 0
        lines = [head, "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _token_near_tie(logits: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per row and step of reference logits [B, N, V], the top-2 gap under which a backend within tolerance
    may pick the other token: twice the tolerance bound at the larger logit."""
    atol, rtol = TOLERANCES[dtype]
    scale = logits.abs().amax(dim=-1).clamp(min=1.0)
    top = logits.abs().amax(dim=-1)
    return 2 * (atol * scale + rtol * top)


def _decode_positions(step, graph, ids: torch.Tensor, prefill_len: int, keys: Sequence[str],
                      cache_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`ids` [B, L] through a decode graph's runner: a prefill of `prefill_len` tokens, then one token per
    call; each output in `keys` gathered over the calls in the prefill graph's layout (logits [B, L, V],
    routing [B*L, k])."""
    from .generation import KVCache, decode_inputs

    b, total = ids.shape
    cache = KVCache.empty(graph, b, dtype=cache_dtype)
    chunks = [(0, prefill_len)] + [(t, t + 1) for t in range(prefill_len, total)]
    gathered: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
    for start, end in chunks:
        out = step(decode_inputs(ids[:, start:end], torch.ones(b, end, dtype=torch.int64), cache))
        cache.update(out, end - start)
        for key in keys:
            if key not in out:
                raise BackendError(f"the decode runner returned no '{key}'")
            gathered[key].append(out[key].reshape(b, end - start, -1))
    return {key: torch.cat(parts, dim=1) if key == "logits" else torch.cat(parts, dim=1).reshape(b * total, -1)
            for key, parts in gathered.items()}


def left_padded_prompts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompts, attention_mask): row r of ids [B, S] with its first min(r, S-1) tokens turned into padding,
    so a batch holds prompts of different lengths."""
    prompts, mask = ids.clone(), torch.ones_like(ids)
    for row in range(1, ids.shape[0]):
        pad = min(row, ids.shape[1] - 1)
        prompts[row, :pad], mask[row, :pad] = 0, 0
    return prompts, mask


def validate_generation(spec: ModelSpec, backends: Sequence[CheckedBackend], *, prompt: int = 6,
                        new_tokens: int = 4, batch: int = 2, dtype: str = "float32", seed: int = 0,
                        weights: Mapping[str, torch.Tensor] | None = None, mla_cache: str = "expanded",
                        strict_support: bool = False, progress: Progress | None = None) -> GenerationReport:
    """Generation through every backend that runs decode graphs (the runner takes and returns tensors by
    graph name: moe_ir.generation.Step), against the float64 reference:
      * decode vs prefill: `prompt + new_tokens` seeded tokens, a prefill of `prompt` then one token per
        call; the logits at every position and every MoE layer's routing compared with the reference
        prefill graph's as `validate_model` compares them (near-tie routing flips reported, not failed);
      * greedy: `batch` prompts (row r left-padded by r tokens), `new_tokens` greedy tokens each, equal to
        the reference's greedy tokens; where a row first differs, the reference's top-2 logit gap at that
        step is reported, a near-tie (under twice the dtype's tolerance) as such, a larger one as a mismatch.
    Backends whose supports() refuses the decode graph are skipped with the reason (a failure only when
    `strict_support`, i.e. when the caller named them)."""
    from .generation import greedy_generate, reference_step
    from .interpreter import interpret
    from .model_builder import GraphForm, build_model_graph
    from .params import init_weights
    from .passes import run_pipeline

    _check_run(dtype, prompt, batch)
    if new_tokens < 1:
        raise SpecError(f"--generate must be at least 1 new token, got {new_tokens}")
    spec = with_dtype(spec, dtype)
    torch_dtype = DType(dtype).torch
    prefill = build_model_graph(spec, routing=True)
    if weights is None:
        weights = init_weights(prefill, seed)

    def fresh():
        return build_model_graph(spec, routing=True, form=GraphForm.DECODE, mla_cache=mla_cache)

    ids = torch.randint(0, spec.model.vocab_size, (batch, prompt + new_tokens),
                        generator=torch.Generator().manual_seed(seed + 2))
    env = interpret(prefill, {"input_ids": ids}, weights, dtype=torch.float64, keep_all=True)
    ref = {key: env[v.name] for key, v in prefill.outputs.items()}
    margins = _model_margins(prefill, env)
    coupled = spec.moe.capacity_factor is not None
    note = ("decode vs prefill not compared: routing with a capacity (or expert choice) couples the tokens of a call, "
            "so a one-token step routes differently from a prefill by design") if coupled else ""
    prompts, mask = left_padded_prompts(ids[:, :prompt])
    ref_graph = fresh()
    expected = greedy_generate(reference_step(ref_graph, weights), ref_graph, prompts, mask, max_new_tokens=new_tokens)
    near = _token_near_tie(expected.logits, dtype)
    has_mla = spec.model.attention.kind.value == "mla"

    results: list[GenerationResult] = []
    for i, backend in enumerate(backends):
        label = backend.label
        if progress is not None:
            progress(f"{label}: generation ({i + 1}/{len(backends)})")
        start = time.perf_counter()
        result = GenerationResult(label, "ok")
        try:
            piped = run_pipeline(fresh(), backend.pipeline)
            ok, reason = backend.supports(piped)
            if not ok:
                result = GenerationResult(label, "skipped", reason, required=strict_support)
            else:
                runner = backend.prepare(piped, {k: v for k, v in weights.items() if k in piped.weights})
                if not coupled:
                    got = _decode_positions(runner, piped, ids, prompt, list(ref), torch_dtype)
                    result.decode = _compare_model(label, got, ref, margins, dtype, ids.shape[1])
                    if result.decode.status != "ok":
                        result.status = "mismatch"
                        result.reason = "decode steps differ from prefill" + (
                            f" ({result.decode.reason})" if result.decode.reason else "")
                run = greedy_generate(runner, piped, prompts, mask, max_new_tokens=new_tokens, cache_dtype=torch_dtype)
                _compare_tokens(result, run.tokens, expected, near)
        except MoeIRError as err:
            skipped = isinstance(err, BackendUnavailable)
            result = GenerationResult(label, "skipped" if skipped else "error", str(err).splitlines()[0],
                                      required=strict_support or not skipped)
        result.seconds = time.perf_counter() - start
        results.append(result)
        if progress is not None:
            progress(f"{label}: generation {result.status} in {result.seconds:.1f}s")
    return GenerationReport(prompt, new_tokens, batch, mla_cache if has_mla else "", results, note)


def _compare_tokens(result: GenerationResult, tokens: torch.Tensor, expected, near: torch.Tensor) -> None:
    """Greedy tokens [B, N] against the reference's; each row compared up to its first difference."""
    bad = False
    for row in range(tokens.shape[0]):
        differs = (tokens[row] != expected.tokens[row]).nonzero().flatten().tolist()
        first = differs[0] if differs else tokens.shape[1]
        result.tokens += first + (1 if differs else 0)
        result.agree += first
        if differs:
            margin, limit = float(expected.margins[row, first]), float(near[row, first])
            if margin < limit:
                result.near_ties.append({"row": row, "step": first, "margin": margin, "threshold": limit})
            else:
                bad = True
    if bad:
        result.status = "mismatch"
        result.reason = (result.reason + "; " if result.reason else "") + "greedy tokens differ beyond near-ties"
