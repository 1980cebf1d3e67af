"""The `onnx` backend: lower the IR (flavours.py), write atomically (writer.py), run in ONNX Runtime (runtime.py).

One backend with a variant, the flavour (portable | ort | plugin): OnnxBackend("ort") answers to "onnx:ort".
Each flavour has its own pass pipeline; `prepare` and `build` run it on a copy of the graph they are given
(the passes are idempotent, so a graph that already went through it is fine), which lets callers hand over
either the raw or the lowered graph.

Precision (what runs where; `build` writes every supported dtype, `prepare`/`load_runner` refuse with a
BackendError naming the reason where ONNX Runtime cannot run the file):
  float32   every flavour, CPU (and CUDA for portable/ort);
  float16   portable: CPU (onnxruntime inserts float32 casts around fp16 nodes its CPU provider has no
            kernel for), CUDA; plugin: CPU, the FusedMoE stand-in computing in float32 (extensions.py);
  bfloat16  exported only (for TensorRT, or onnxruntime-gpu in the user's own code): onnxruntime's CPU
            provider has no bfloat16 arithmetic kernels (MatMul, Gemm, Add, Mul, Sigmoid, ...), and its
            Python API has no numpy type to hand bfloat16 tensors in or out.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from moe_ir.artifacts import OutputFolder
from moe_ir.errors import BackendError, BackendUnavailable, MoeIRError
from moe_ir.ir import Graph, from_json, to_json
from moe_ir.model_builder import is_decode_graph
from moe_ir.model_spec import ModelSpec
from moe_ir.passes import run_pipeline
from moe_ir.spec import LayerSpec
from ..base import Backend, BuildResult, Runner
from . import genai
from .flavours import PIPELINES, OrtLowering, lower, lowering_class, parse_flavour, supports
from .lowering import Flavour
from .runtime import make_runner, make_session, runtime_refusal
from .support import stored_values
from .writer import EXTERNAL_DATA_THRESHOLD, Progress, embedded_model, write_model


def _copy(graph: Graph) -> Graph:
    return from_json(to_json(graph))


def lowered_graph(graph: Graph, flavour: Flavour | str) -> Graph:
    """A copy of `graph` after the flavour's pipeline."""
    return run_pipeline(_copy(graph), PIPELINES[Flavour(flavour)])


class OnnxBackend(Backend):
    name = "onnx"
    summary = "ONNX (opset 18): portable standard ops | ort (com.microsoft.MoE) | plugin (moe_ir::FusedMoE); runs in ONNX Runtime"
    # special_tokens / context_length / tokenizer_files: what a decoder build (a decode graph) writes into
    # genai_config.json and copies beside the model, from the source checkpoint
    build_options = frozenset({"flavour", "external_data", "special_tokens", "context_length", "tokenizer_files",
                               "int4_activations"})
    default_variants = tuple(f.value for f in Flavour)

    def __init__(self, variant: Flavour | str | None = None):
        self.flavour = parse_flavour(variant or Flavour.PORTABLE)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.flavour.value}"

    @property
    def pipeline(self) -> tuple[str, ...]:  # type: ignore[override]
        return PIPELINES[self.flavour]

    def supports(self, graph: Graph, *, flavour: Flavour | str | None = None) -> tuple[bool, str]:
        flavour = parse_flavour(flavour or self.flavour)
        try:
            return supports(lowered_graph(graph, flavour), flavour)
        except MoeIRError as err:
            return False, str(err)

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, flavour: Flavour | str | None = None,
                providers: Sequence[str] | None = None, threads: int | None = None,
                int4_activations: str | None = None, **options: Any) -> Runner:
        flavour = parse_flavour(flavour or self.flavour)
        piped = lowered_graph(graph, flavour)
        refusal = runtime_refusal({v.type.dtype.value for v in stored_values(piped)}, flavour)
        if refusal:
            raise BackendUnavailable(f"onnx/{flavour.value}: {refusal}")
        lowered = lower(piped, weights, flavour, int4_activations=int4_activations)
        with tempfile.TemporaryDirectory(prefix="moe-ir-onnx-") as tmp:
            if lowered.initializer_bytes() > EXTERNAL_DATA_THRESHOLD:
                # Too big for one protobuf: write with external data, load, then drop the files
                # (ONNX Runtime has read or mapped them; an unlinked mapping stays valid).
                path = write_model(lowered, Path(tmp) / "model.onnx", external_data=True,
                                   for_runtime=flavour == Flavour.PLUGIN)
                model: str | bytes = str(path)
            else:
                model = embedded_model(lowered, for_runtime=flavour == Flavour.PLUGIN).SerializeToString()
            session = make_session(model, flavour, providers=providers, threads=threads,
                                   int8_activations=int4_activations == "int8")
        return make_runner(session, graph)

    def write_artifact(self, spec: LayerSpec | ModelSpec, graph: Graph, weights: Mapping[str, torch.Tensor],
                       out: OutputFolder, *, flavour: Flavour | str | None = None, external_data: bool | None = None,
                       progress: Progress | None = None, special_tokens: Mapping[str, int | None] | None = None,
                       context_length: int | None = None, tokenizer_files: Sequence[Path] = (),
                       int4_activations: str | None = None, **options: Any) -> BuildResult:
        """OUT/<name>.<flavour>.onnx, and OUT/<name>.<flavour>.onnx.data when external (a .data file of an
        earlier build is removed when this one embeds its weights). `spec` is the layer's or, for a
        whole-model graph (build_model_graph), the model's; only its name is used here.

        A decode graph (build_model_graph(form="decode")) is a deployable decoder folder instead:
        OUT/model.onnx (+ .data), OUT/genai_config.json where onnxruntime-genai can run it (genai.py; the
        notes say why not otherwise), and copies of `tokenizer_files` (the source checkpoint's).

        int4_activations "int8" (ort flavour, int4/int8 weights): QMoE and MatMulNBits compute on int8
        activations (accuracy_level 4), marked in the file's metadata so moe-ir's runners keep it so."""
        flavour = parse_flavour(flavour or self.flavour)
        piped = lowered_graph(graph, flavour)
        ok, reason = supports(piped, flavour)
        if not ok:
            raise BackendError(f"onnx/{flavour.value} cannot export spec '{spec.name}': {reason}")
        lowered = lower(piped, weights, flavour, int4_activations=int4_activations)
        if external_data is None:
            external_data = lowered.initializer_bytes() > EXTERNAL_DATA_THRESHOLD
        decoder = is_decode_graph(piped)
        name = genai.DECODER_FILE if decoder else f"{spec.name}.{flavour.value}.onnx"
        out.claim(name + ".data")  # write_model names the data file after the model, beside it
        write_model(lowered, out.path(name), external_data=external_data, progress=progress)
        files = [out.final(name)] + ([out.final(name + ".data")] if external_data else [])
        dtypes = sorted({v.type.dtype.value for v in stored_values(piped)})
        dynamic = "B,S,P (past length)" if decoder else "B,S"
        opset = max(o.version for o in lowered.model.opset_import if o.domain in ("", "ai.onnx"))
        notes = [f"opset {opset}, dynamic dims {dynamic}; flavour {flavour.value}; {'/'.join(dtypes)}"]
        refusal = runtime_refusal(dtypes, flavour)
        if refusal:
            notes.append(f"not runnable by moe-ir's ONNX Runtime runner: {refusal}")
        notes.extend(lowering_class(flavour).needs)
        if flavour == Flavour.ORT:
            notes.extend(OrtLowering.contrib_notes(piped, [n.op_type for n in lowered.model.graph.node],
                                                   int8_activations=int4_activations == "int8"))
        if decoder:
            files += self._write_decoder_extras(piped, out, special_tokens, context_length, tokenizer_files, notes)
        return BuildResult(files=files, notes=notes)

    @staticmethod
    def _write_decoder_extras(graph: Graph, out: OutputFolder, special_tokens, context_length,
                              tokenizer_files: Sequence[Path], notes: list[str]) -> list[Path]:
        """genai_config.json (where GenAI can take the graph) and the tokenizer files; the notes say which."""
        files = []
        out.claim(genai.GENAI_CONFIG)  # a config of an earlier build goes when this one writes none
        refusal = genai.genai_refusal(graph)
        if refusal:
            notes.append(f"genai: no {genai.GENAI_CONFIG} written: {refusal}")
        else:
            config = genai.genai_config(graph, tokens=special_tokens, context_length=context_length)
            out.path(genai.GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            files.append(out.final(genai.GENAI_CONFIG))
            notes.append(f"genai: {genai.GENAI_CONFIG} written (type {genai.MODEL_TYPE}, "
                         f"{config['model']['decoder']['num_key_value_heads']} kv heads x "
                         f"{config['model']['decoder']['head_size']}); onnxruntime_genai.Model(folder) loads it")
            eos_note = genai.missing_eos_note(special_tokens)
            if eos_note:
                notes.append(eos_note)
        copied = []
        for src in tokenizer_files:
            src = Path(src)
            shutil.copyfile(src, out.path(src.name))
            files.append(out.final(src.name))
            copied.append(src.name)
        if copied:
            notes.append(f"copied from the checkpoint: {', '.join(copied)}")
        return files
