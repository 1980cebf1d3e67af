"""TensorRT backend: the plugin-flavour ONNX, a `moe_ir::FusedMoE` plugin, an engine and its manifest.

    moe-ir build spec.yaml --backend tensorrt -o OUT [--profile 1,256,4096] [--precision bf16]

writes into OUT:
  <name>.plugin.onnx            the ONNX backend's plugin flavour (one moe_ir::FusedMoE node + shared experts)
  moe_ir_fused_moe_plugin.py    a standalone copy of plugin.py (registers the plugin; needs torch, triton)
  <name>.tensorrt.json          bundle manifest: spec hash, precision, profile, files, the finishing command
  <name>.engine, <name>.engine.json   the engine and its manifest (only where TensorRT and a GPU exist)

Trust: the bundle's plugin module is Python and runs wherever the engine is built or loaded, so a bundle is
code, not data; the manifest records the sha256 of every bundle file, checked before use.

Honest absence: without TensorRT or a CUDA GPU the first three files are still written, complete, and the
build stops with one BackendError naming what is missing and the exact command that finishes the build on
a machine that has them. `supports()` therefore judges the graph only; a missing TensorRT is reported as a
note on a supported graph, so `moe-ir build` reaches the bundle. `prepare()` (validate) needs both.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from moe_ir.artifacts import OutputFolder
from moe_ir.builder import spec_hash
from moe_ir.errors import BackendError, BackendUnavailable
from moe_ir.ir import ElemType, Graph, OpCode
from moe_ir.passes import unfused_moe_reason
from moe_ir.spec import DType, LayerSpec
from ..base import Backend, BuildResult, Runner
from ..integrity import sha256_file
from ..registry import get_backend
from .. import torch_source
from . import plugin as plugin_source

# engine.py is imported inside functions: it is also run as `python -m moe_ir.backends.tensorrt.engine`,
# which warns when the package has already imported the module it is about to execute.

PLUGIN_BUNDLE_NAME = "moe_ir_fused_moe_plugin.py"
PRECISIONS = {"fp32": DType.FLOAT32, "fp16": DType.FLOAT16, "bf16": DType.BFLOAT16}


# plugin.py's one import of the shared torch kernels, which the bundled copy replaces by their source.
_KERNEL_IMPORT = re.compile(r"^from moe_ir\.backends\.torch_kernels import ([\w, ]+?)\s*(#.*)?$", re.M)


def plugin_bundle_source() -> str:
    """The text of the bundled plugin module: plugin.py with its import of the torch kernels replaced by the
    kernels' source (and every kernel they call), copied verbatim, so the bundle runs without moe_ir."""
    text = Path(plugin_source.__file__).read_text()
    match = _KERNEL_IMPORT.search(text)
    if match is None:
        raise BackendError(f"{plugin_source.__file__}: no `from moe_ir.backends.torch_kernels import ...` line to "
                           "inline; the bundled plugin would need moe_ir")
    names = [name.strip() for name in match.group(1).split(",")]
    copied = "\n".join(torch_source.source_lines(torch_source.closure(names))).strip("\n")
    # the imports the copied kernels rely on, whichever of them plugin.py itself lacks
    present = set(text.splitlines())
    imports = "\n".join(line for line in torch_source.HEADER_IMPORTS if line and line not in present)
    note = "# The shared torch kernels (moe_ir/backends/torch_kernels/), copied verbatim by `moe-ir build`.\n"
    return text[:match.start()] + note + (imports + "\n\n" if imports else "\n") + copied + "\n" + text[match.end():]


def environment_problems() -> list[str]:
    """What this machine lacks for building or running engines (empty when nothing)."""
    version = plugin_source.tensorrt_version()
    problems = []
    if version is None:
        problems.append(plugin_source.NOT_INSTALLED)
    else:
        try:
            plugin_source.implementation_for(version)
        except plugin_source.PluginError as err:
            problems.append(str(err))
    # Reported with a missing TensorRT too: installing TensorRT alone would not finish the build here.
    if not torch.cuda.is_available():
        problems.append("no CUDA GPU: a GPU with a CUDA build of torch is not installed on this machine")
    return problems


def _profile(value: Any):
    from .engine import DEFAULT_PROFILE, TokenProfile

    if value is None:
        return TokenProfile(*DEFAULT_PROFILE)
    if isinstance(value, TokenProfile):
        return value
    if isinstance(value, (tuple, list)):
        return TokenProfile(*(int(v) for v in value))
    return TokenProfile.parse(str(value))


class TensorRTBackend(Backend):
    name = "tensorrt"
    summary = "TensorRT engine with the moe_ir::FusedMoE plugin (Python/AOT Triton, IPluginV3 fallback)"
    build_options = frozenset({"profile", "precision", "flavour"})
    # The ONNX plugin flavour's pipeline: the engine is built from that export.
    pipeline = ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "fuse-gate-up-quantized", "dce")

    def supports_graph(self, graph: Graph) -> tuple[bool, str]:
        """Whether the graph lowers to the plugin-flavour ONNX: the structural half of supports (the ONNX
        backend exports f32, f16 and bf16 plugin models; the precision is their types)."""
        from ..onnx import plugin_op

        fused = graph.find(OpCode.FUSED_MOE)
        routed = _routed_parts(fused[0]) if len(fused) == 1 else set()
        others = [n.name for n in graph.find(OpCode.DEQUANTIZE) if fused and n.outputs[0] not in fused[0].inputs]
        if others:
            return False, (f"quantized weights outside the routed experts ({', '.join(others[:3])}): the "
                           f"{plugin_op.QUANT_PLUGIN_NAME} plugin takes the routed experts' stored parts, while "
                           f"the plugin ONNX dequantizes the others with blocked DequantizeLinear (opset 21), which "
                           f"has not been checked against TensorRT's parser; quantize the routed experts only "
                           f"(quantization.weights: {{shared_experts: false}})")
        for value in list(graph.inputs) + list(graph.weights.values()):
            if value.type.dtype not in (ElemType.FLOAT32, ElemType.FLOAT16, ElemType.BFLOAT16) and \
                    value.name not in routed:
                return False, f"{value.name} is {value.type.dtype.value}; TensorRT takes f32, f16 or bf16"
        if graph.find(OpCode.BALANCE_LOSS):
            return False, "balance losses are training outputs; TensorRT engines are inference graphs"
        if len(fused) != 1:
            return False, (f"the moe_ir::FusedMoE plugin needs the routed path as one fused_moe node "
                           f"({unfused_moe_reason(graph)})")
        return plugin_op.plugin_supports(fused[0])

    def supports(self, graph: Graph) -> tuple[bool, str]:
        ok, reason = self.supports_graph(graph)
        if not ok:
            return ok, reason
        problems = environment_problems()
        if problems:
            return True, f"{'; '.join(problems)}: build writes the ONNX + plugin bundle only"
        return True, ""

    # -- validate

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], *, profile: Any = None,
                aot: bool = True, **options: Any) -> Runner:
        """Export, build an engine in a temporary folder and load it (needs TensorRT and a GPU)."""
        problems = environment_problems()
        if problems:
            raise BackendUnavailable(f"tensorrt: {'; '.join(problems)}")
        ok, reason = self.supports_graph(graph)
        if not ok:
            raise BackendError(f"tensorrt: {reason}")
        from .engine import build_engine
        from .runner import EngineRunner

        from ..onnx import EXTERNAL_DATA_THRESHOLD, lower, write_model

        # The ONNX (with its weights) and the engine are only needed until the engine is deserialised; for a
        # published layer they are tens of GB, so they must not stay behind in /tmp after every validate.
        with tempfile.TemporaryDirectory(prefix="moe_ir_trt_") as tmp:
            work = Path(tmp)
            model = lower(graph, weights, "plugin")
            onnx_path = write_model(model, work / f"{graph.name}.plugin.onnx",
                                    external_data=model.initializer_bytes() > EXTERNAL_DATA_THRESHOLD)
            engine_path = work / f"{graph.name}.engine"
            build_engine(onnx_path, engine_path, profile=_profile(profile),
                         spec_hash=graph.meta.get("spec_hash") or None, aot=aot, progress=False)
            engine = EngineRunner(engine_path)

        def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {k: v.to(x.device) for k, v in engine(x).items()}  # results where the caller's x lives

        return run

    # -- build

    def write_artifact(self, spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out: OutputFolder, *,
                       profile: Any = None, precision: str | None = None, flavour: str | None = None, aot: bool = True,
                       **options: Any) -> BuildResult:
        """The bundle (plugin ONNX, plugin module, manifest) and, where TensorRT and a GPU exist, the engine and
        its manifest: one output, committed by `build`. Without them the bundle is committed and the build
        ends with BackendUnavailable saying how to finish it (a stale engine of an earlier build is removed)."""
        from .engine import build_engine, finish_command, manifest_path

        if flavour not in (None, "plugin"):
            raise BackendError(f"the tensorrt backend builds from the ONNX plugin flavour, not '{flavour}'")
        token_profile = _profile(profile)
        self._check_precision(graph, precision)
        ok, reason = self.supports_graph(graph)
        if not ok:
            raise BackendError(f"tensorrt cannot build spec '{spec.name}': {reason}")
        exported = self._export_onnx(spec, graph, weights, out, options.get("progress"))
        onnx_path = exported.files[0]
        plugin_copy = self._write_plugin_module(out)
        engine_name = f"{spec.name}.engine"
        engine_path, engine_manifest = out.final(engine_name), manifest_path(out.final(engine_name))
        staged_engine = out.claim(engine_name)
        out.claim(engine_manifest.name)
        digest = spec_hash(spec)
        command = finish_command(onnx_path, engine_path, token_profile, plugin_copy, digest)
        problems = environment_problems()
        quantized = any(n.op == OpCode.DEQUANTIZE for n in graph.nodes)
        bundle = self._write_bundle_manifest(out, spec, digest, token_profile, exported.files, plugin_copy,
                                             engine_path, command, problems, quantized=quantized)
        files = [*exported.files, plugin_copy, bundle]
        if problems:
            return BuildResult(files=files, unfinished=BackendUnavailable(
                f"tensorrt: {'; '.join(problems)}. Wrote the plugin ONNX and plugin module to {out.folder}/ (see "
                f"{bundle.name}); finish the build on a machine with TensorRT >= 10.6 and a CUDA GPU: {command}"))
        manifest = build_engine(out.path(onnx_path.name), staged_engine, profile=token_profile, spec_hash=digest,
                                aot=aot)
        out.path(engine_name)
        out.path(engine_manifest.name)  # both must now be there
        files += [engine_path, engine_manifest]
        return BuildResult(files=files, notes=[
            f"TensorRT {manifest.tensorrt_version}, plugin implementation {manifest.plugin['implementation']}, "
            f"{manifest.dtype}, tokens {token_profile.text()}"])

    @staticmethod
    def _export_onnx(spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out: OutputFolder,
                     progress: Any = None) -> BuildResult:
        """OUT/<name>.plugin.onnx through the ONNX backend (it owns the lowering, in the graph's types), into
        the same output."""
        return get_backend("onnx").write_artifact(spec, graph, weights, out, flavour="plugin", progress=progress)

    @staticmethod
    def _check_precision(graph: Graph, precision: str | None) -> None:
        """The precision is the network's types (TensorRT networks are strongly typed): the graph must already
        be in that dtype (`moe-ir build --precision` builds it so); a backend never rebuilds it from the spec."""
        if precision is None:
            return
        if precision not in PRECISIONS:
            raise BackendError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
        want = ElemType.from_name(PRECISIONS[precision])
        got = graph.inputs[0].type.dtype
        if got != want:
            raise BackendError(f"--precision {precision}: the graph '{graph.name}' is {got.value}; build it in "
                               f"{PRECISIONS[precision].value} (`moe-ir build --precision {precision}` does)")

    @staticmethod
    def _write_plugin_module(out: OutputFolder) -> Path:
        out.path(PLUGIN_BUNDLE_NAME).write_text(plugin_bundle_source())
        return out.final(PLUGIN_BUNDLE_NAME)

    @staticmethod
    def _write_bundle_manifest(out: OutputFolder, spec: LayerSpec, digest: str, profile: Any,
                               onnx_files: list[Path], plugin_copy: Path, engine_path: Path, command: str,
                               problems: list[str], quantized: bool = False) -> Path:
        """OUT/<name>.tensorrt.json; the files it lists are read (for their sha256) where they are staged."""
        implementations = {
            "aot": f"TensorRT >= {'.'.join(map(str, plugin_source.AOT_PLUGINS_SINCE))}",
            "python": f"TensorRT >= {'.'.join(map(str, plugin_source.PYTHON_PLUGINS_SINCE))}",
            "v3": "TensorRT 10.0-10.5 (needs moe-ir installed)"}
        if quantized:  # QFusedMoE: no IPluginV3 fallback (see plugin.py)
            del implementations["v3"]
        data = {
            "spec": spec.name, "spec_hash": digest, "dtype": str(spec.dtype),
            "profile": {"min": profile.min, "opt": profile.opt, "max": profile.max},
            "onnx": [p.name for p in onnx_files], "plugin": {
                "name": plugin_source.QUANT_PLUGIN_OP if quantized else plugin_source.PLUGIN_OP,
                "namespace": plugin_source.PLUGIN_NAMESPACE, "module": plugin_copy.name,
                "implementations": implementations},
            "engine": engine_path.name, "engine_status": "missing" if problems else "built",
            "missing": problems, "finish_command": command,
            # Checked before the plugin module runs or the ONNX is parsed (engine.verify_bundle).
            "sha256": {p.name: sha256_file(out.path(p.name)) for p in [*onnx_files, plugin_copy]},
            "run": "python -c \"from moe_ir.backends.tensorrt.runner import load_engine; "
                   f"r = load_engine('{engine_path}')\"",
        }
        name = f"{spec.name}.tensorrt.json"
        out.path(name).write_text(json.dumps(data, indent=2) + "\n")
        return out.final(name)


def _routed_parts(node) -> set[str]:
    """Names of the stored parts (codes, scales, zero points) behind a FUSED_MOE node's quantized expert
    weights: the weights its DEQUANTIZE inputs read, directly or through the CONCATs of fuse-gate-up-quantized."""
    names: set[str] = set()
    for weight in (node.input("w_up"), node.input("w_down"), node.input("w_gate")):
        if weight is None or weight.producer is None or weight.producer.op != OpCode.DEQUANTIZE:
            continue
        pending = [v for v in weight.producer.inputs if v is not None]
        while pending:
            value = pending.pop()
            if value.producer is None:
                names.add(value.name)
            elif value.producer.op == OpCode.CONCAT:
                pending.extend(value.producer.inputs)
    return names


__all__ = ["PLUGIN_BUNDLE_NAME", "TensorRTBackend", "environment_problems"]
