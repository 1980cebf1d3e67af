"""Build a TensorRT engine from the plugin-flavour ONNX, and the manifest that guards loading it.

    python -m moe_ir.backends.tensorrt.engine OUT/<name>.plugin.onnx --profile 1,256,4096 -o OUT/<name>.engine

What the build does, in order:
  1. register the plugin `moe_ir::FusedMoE` (plugin.py; or the copy in a bundle with --plugin-module):
     AOT Triton kernel on TensorRT >= 10.9, Python @impl on >= 10.6, the IPluginV3 class before that;
  2. give the ONNX node what the parser uses to find the plugin (`plugin_namespace`, and `aot=1` for the
     AOT implementation) in memory, leaving the file as the ONNX backend wrote it;
  3. parse into a strongly typed network: precision comes from the ONNX types (the model is exported in
     fp32, fp16 or bf16), which is the only mode TensorRT 11 has;
  4. one optimisation profile over the token count: x [B,S,H] is given as [1, T, H] for T in min..max
     (the layer is token-wise, so the runner folds B into S); a [T,H] input gets T directly;
  5. build with a progress monitor printing phases, serialise, and write the engine and the manifest
     (JSON beside it) each atomically, the engine first, so a manifest always describes a complete engine.

The manifest records the spec hash, the TensorRT version, the profile, the plugin implementation and the
I/O names and the sha256 of the engine and its plugin module; `load_manifest(..., expect=...)` refuses an
engine built for another spec or TensorRT version, `check_engine_files` one whose bytes changed.

Trust: an engine, and a bundle's plugin module (Python), are code. A bundle's files are checked against the
sha256s of its manifest (`verify_bundle`) before the module runs or the ONNX is parsed, and the ONNX's
external data must lie inside its folder; a checksum catches damage, not a hostile author.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from moe_ir.errors import BackendError, MoeIRError
from moe_ir.params import atomic_write
from ..integrity import MANIFEST_MAX_BYTES, check_digests, confined_file, regular_file, sha256_file
from . import plugin as plugin_module_default

MANIFEST_FORMAT = 1
DEFAULT_PROFILE = (1, 256, 4096)
NOT_INSTALLED = plugin_module_default.NOT_INSTALLED


@dataclass(frozen=True)
class TokenProfile:
    """min/opt/max token counts of the one optimisation profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise BackendError(f"token profile must satisfy 1 <= min <= opt <= max, got "
                               f"{self.min},{self.opt},{self.max}")

    @classmethod
    def parse(cls, text: str) -> "TokenProfile":
        parts = text.split(",")
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3:
            raise BackendError(f"--profile takes MIN,OPT,MAX token counts (e.g. 1,256,4096), got '{text}'")
        return cls(*values)

    def text(self) -> str:
        return f"{self.min},{self.opt},{self.max}"


def profile_shapes(x_dims: Sequence[Any], profile: TokenProfile) -> tuple[tuple[int, ...], ...]:
    """(min, opt, max) shapes of x for the profile: [T,H] -> (T,H); [B,S,H] -> (1,T,H)."""
    hidden = x_dims[-1]
    if not isinstance(hidden, int) or hidden <= 0:
        raise BackendError(f"input x needs a static hidden size, got dims {list(x_dims)}")
    if len(x_dims) == 2:
        return tuple((t, hidden) for t in (profile.min, profile.opt, profile.max))
    if len(x_dims) == 3:
        return tuple((1, t, hidden) for t in (profile.min, profile.opt, profile.max))
    raise BackendError(f"input x must be [T,H] or [B,S,H], got dims {list(x_dims)}")


# ------------------------------------------------------------------------------------------------
# manifest


@dataclass
class EngineManifest:
    spec_hash: str
    tensorrt_version: str
    profiles: list[dict[str, int]]
    plugin: dict[str, str]          # name, namespace, implementation (python|aot|v3), module
    dtype: str
    inputs: list[str]
    outputs: list[str]
    engine: str = ""                # file name of the engine beside the manifest
    format: int = MANIFEST_FORMAT
    notes: list[str] = field(default_factory=list)
    # sha256 of the engine ("engine") and of the plugin module it registers ("plugin_module"): checked
    # before TensorRT deserialises the engine or Python runs the module (check_engine_files).
    sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "<manifest>") -> "EngineManifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise BackendError(f"{where}: not a valid engine manifest (bad JSON: {err.msg} at line {err.lineno})") from None
        if not isinstance(data, dict):
            raise BackendError(f"{where}: not a valid engine manifest (expected a JSON object)")
        required = ("spec_hash", "tensorrt_version", "profiles", "plugin", "dtype", "inputs", "outputs")
        missing = [k for k in required if k not in data]
        if missing:
            raise BackendError(f"{where}: engine manifest lacks {', '.join(missing)}; rebuild the engine")
        if data.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
            raise BackendError(f"{where}: engine manifest format {data.get('format')} is not {MANIFEST_FORMAT}; "
                               f"rebuild the engine with this moe-ir")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def manifest_path(engine_path: str | Path) -> Path:
    """OUT/<name>.engine -> OUT/<name>.engine.json"""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_manifest(engine_path: str | Path, manifest: EngineManifest) -> Path:
    text = manifest.to_json()

    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
        os.chmod(tmp, 0o644)

    return atomic_write(manifest_path(engine_path), write)


def check_manifest(manifest: EngineManifest, *, spec_hash: str | None = None, tensorrt_version: str | None = None,
                   where: str = "<engine>") -> None:
    """Refuse an engine built for another spec or another TensorRT version (a serialised engine is only
    valid for the exact TensorRT version that built it)."""
    if spec_hash is not None and manifest.spec_hash and spec_hash != manifest.spec_hash:
        raise BackendError(f"{where} was built for spec hash {manifest.spec_hash}, but this spec hashes to "
                           f"{spec_hash}; rebuild it with `moe-ir build SPEC --backend tensorrt`")
    if tensorrt_version is not None and tensorrt_version != manifest.tensorrt_version:
        raise BackendError(f"{where} was built with TensorRT {manifest.tensorrt_version}, this machine has "
                           f"TensorRT {tensorrt_version}; engines only load in the version that built them: "
                           f"rebuild it (python -m moe_ir.backends.tensorrt.engine ...)")


def load_manifest(engine_path: str | Path, *, spec_hash: str | None = None,
                  tensorrt_version: str | None = None) -> EngineManifest:
    path = manifest_path(engine_path)
    if not Path(engine_path).is_file():
        raise BackendError(f"no engine at {engine_path}")
    if not path.is_file():
        raise BackendError(f"engine {engine_path} has no manifest ({path.name}); it was not built by moe-ir "
                           f"or the build did not finish: rebuild it")
    manifest = EngineManifest.from_json(path.read_text(), where=str(path))
    check_manifest(manifest, spec_hash=spec_hash, tensorrt_version=tensorrt_version, where=str(engine_path))
    return manifest


# ------------------------------------------------------------------------------------------------
# what is checked before loading: an engine and a plugin module are code


def check_engine_files(manifest: EngineManifest, engine_path: str | Path) -> Path | None:
    """Before TensorRT deserialises the engine (which runs its kernels) and Python runs the plugin module:
    the engine's sha256 must be the manifest's, and so must a plugin module's other than the installed one
    (a bundle's copy). Returns the plugin module to load, None for the installed one. Raises BackendError.

    A checksum tells a damaged or edited file from the one moe-ir wrote; it does not make a file from
    an untrusted source safe: whoever could edit the engine could edit its manifest too."""
    engine_path = Path(engine_path)
    recorded = manifest.sha256 if isinstance(manifest.sha256, dict) else {}
    if not recorded.get("engine"):
        raise BackendError(f"{engine_path}: its manifest records no sha256, so the engine cannot be checked before "
                           f"TensorRT loads it; rebuild it with this moe-ir")
    check_digests(engine_path.parent, {engine_path.name: recorded["engine"]}, str(engine_path))
    module = manifest.plugin.get("module")
    if not module or not Path(module).is_file():
        return None  # built elsewhere: the installed plugin registers the same op
    module_path = Path(module)
    if module_path.resolve() == Path(plugin_module_default.__file__).resolve():
        return None  # part of this moe-ir installation, trusted like the rest of it
    digest = recorded.get("plugin_module")
    regular_file(module_path, "plugin module")
    if not digest or sha256_file(module_path) != digest:
        raise BackendError(f"{engine_path}: plugin module {module_path} is not the file the engine was built with "
                           f"(sha256 {'not recorded' if not digest else 'differs'}); it is Python that would run "
                           f"at load: rebuild the engine, or restore the module")
    return module_path


def bundle_manifest_path(onnx_path: str | Path) -> Path | None:
    """OUT/<name>.plugin.onnx -> OUT/<name>.tensorrt.json (the bundle `moe-ir build --backend tensorrt`
    writes); None for a file not named like a bundle's ONNX."""
    onnx_path = Path(onnx_path)
    suffix = ".plugin.onnx"
    if not onnx_path.name.endswith(suffix):
        return None
    return onnx_path.with_name(onnx_path.name[:-len(suffix)] + ".tensorrt.json")


def verify_bundle(onnx_path: str | Path) -> list[Path]:
    """Check the files of the bundle `onnx_path` belongs to against the sha256s its manifest records
    (the ONNX, its external data and the plugin module, all confined to the bundle's folder), before
    any of them is parsed or run. Returns the checked files (resolved); [] when there is no bundle
    manifest beside the ONNX. Raises BackendError."""
    bundle = bundle_manifest_path(onnx_path)
    if bundle is None or not bundle.exists():
        return []
    info = regular_file(bundle, "bundle manifest")
    if info.st_size > MANIFEST_MAX_BYTES:
        raise BackendError(f"{bundle}: {info.st_size} bytes is more than a bundle manifest holds")
    try:
        data = json.loads(bundle.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise BackendError(f"{bundle}: not a valid bundle manifest ({err})") from None
    digests = data.get("sha256") if isinstance(data, dict) else None
    if not isinstance(digests, dict) or not digests or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in digests.items()):
        raise BackendError(f"{bundle}: the bundle manifest records no sha256 of its files, so they cannot be "
                           f"checked before the plugin module runs; rebuild the bundle with "
                           f"`moe-ir build --backend tensorrt`")
    if Path(onnx_path).name not in digests:
        raise BackendError(f"{bundle}: the bundle manifest does not list {Path(onnx_path).name}")
    check_digests(bundle.parent, digests, str(bundle))
    return [confined_file(bundle.parent, name, str(bundle))[0] for name in digests]


# ------------------------------------------------------------------------------------------------
# the ONNX the parser sees


def parser_model(onnx_path: str | Path, *, aot: bool):
    """The ONNX model (graph only; external weights stay in their file) with each FusedMoE node marked for
    the TensorRT parser: `plugin_namespace` names the plugin's namespace, `aot=1` asks for the AOT
    implementation. Raises BackendError unless there is exactly one such node."""
    from onnx import helper

    from ..onnx.external_data import load_model

    # Graph only; its external-data locations are confined to its folder before the parser reads them.
    model = load_model(onnx_path)
    node = plugin_node(model, onnx_path)
    if node.domain not in ("", plugin_module_default.PLUGIN_NAMESPACE):
        raise BackendError(f"{onnx_path}: node {node.name} is in domain '{node.domain}', expected "
                           f"'{plugin_module_default.PLUGIN_NAMESPACE}'")
    kept = [a for a in node.attribute if a.name not in ("plugin_namespace", "aot")]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute("plugin_namespace", plugin_module_default.PLUGIN_NAMESPACE))
    if aot:
        node.attribute.append(helper.make_attribute("aot", 1))
    return model


def plugin_node(model, where: Any = "<model>"):
    """The one FusedMoE or QFusedMoE node of a plugin-flavour model (BackendError unless exactly one)."""
    nodes = [n for n in model.graph.node if n.op_type in plugin_module_default.PLUGIN_OPS]
    if len(nodes) != 1:
        raise BackendError(f"{where}: expected one {plugin_module_default.PLUGIN_ID} node, found {len(nodes)} (or "
                           f"one {plugin_module_default.QUANT_PLUGIN_ID} node, for quantized experts); export with "
                           f"`--backend onnx --flavour plugin`")
    return nodes[0]


def parser_plugin_fields(node) -> list[tuple[str, Any, str]]:
    """The plugin fields TensorRT's ONNX parser makes of the plugin node's attributes: (name, numpy array,
    PluginFieldType name), an INT attribute an INT32 field, a FLOAT one FLOAT32; its own routing attributes
    (plugin_namespace, plugin_version, aot) are not the plugin's. What a plugin creator receives."""
    import numpy as np
    from onnx import AttributeProto

    fields = []
    for attr in node.attribute:
        if attr.name in ("plugin_namespace", "plugin_version", "aot"):
            continue
        if attr.type == AttributeProto.INT:
            fields.append((attr.name, np.array([attr.i], dtype=np.int32), "INT32"))
        elif attr.type == AttributeProto.FLOAT:
            fields.append((attr.name, np.array([attr.f], dtype=np.float32), "FLOAT32"))
        else:
            raise BackendError(f"plugin node {node.name}: attribute {attr.name} is not an int or a float; the "
                               f"plugin contract has no other attribute types")
    return fields


def onnx_facts(model) -> dict[str, Any]:
    """What the build needs from the model: x's name, dims and dtype, output names, the spec hash."""
    from onnx import TensorProto

    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(graph_inputs) != 1:
        raise BackendError(f"expected one activation input, found {[i.name for i in graph_inputs]}")
    x = graph_inputs[0]
    tensor_type = x.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
    if tensor_type.elem_type not in names:
        raise BackendError(f"input {x.name} has ONNX type {tensor_type.elem_type}; expected float32/float16/bfloat16")
    meta = {p.key: p.value for p in model.metadata_props}
    return {"input": x.name, "dims": dims, "dtype": names[tensor_type.elem_type],
            "outputs": [o.name for o in model.graph.output], "spec_hash": meta.get("moe_ir.spec_hash", "")}


# ------------------------------------------------------------------------------------------------
# build


def load_plugin_module(path: str | Path | None) -> ModuleType:
    """plugin.py of this package, or a copy of it (the one in a build bundle). A module given by path is
    Python and runs here: trust it like code (callers check a bundle's copy with verify_bundle or
    check_engine_files first)."""
    if path is None:
        return plugin_module_default
    path = Path(path)
    if not path.is_file():
        raise BackendError(f"plugin module {path} does not exist")
    spec = importlib.util.spec_from_file_location("moe_ir_tensorrt_plugin_bundle", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def require_tensorrt():
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: the bindings without libnvinfer
        raise BackendError(NOT_INSTALLED) from None
    return trt


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise BackendError("no CUDA GPU: a GPU with a CUDA build of torch is not installed on this machine; "
                           "TensorRT engines build and run on a GPU")


def make_progress_monitor(trt: Any, stream=sys.stderr):
    """An IProgressMonitor that prints each build phase and its steps, indented by nesting."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._depth: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            print(f"[tensorrt] {'  ' * depth}{phase_name} ({num_steps} steps)", file=stream, flush=True)

        def step_complete(self, phase_name, step):
            depth = self._depth.get(phase_name, 0)
            print(f"[tensorrt] {'  ' * depth}  {phase_name}: step {step + 1}", file=stream, flush=True)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            depth = self._depth.pop(phase_name, 0)
            print(f"[tensorrt] {'  ' * depth}{phase_name} done", file=stream, flush=True)

    return BuildProgress()


def _network_flags(trt: Any, version: tuple[int, ...], implementation: str) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if version < (10,):
        flags |= 1 << int(creation.EXPLICIT_BATCH)  # implicit by default only from 10.0
    if hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    # With both @impl and @aot_impl registered TensorRT must be told which one to take.
    preference = "PREFER_AOT_PYTHON_PLUGINS" if implementation == "aot" else "PREFER_JIT_PYTHON_PLUGINS"
    if implementation in ("aot", "python") and hasattr(creation, preference):
        flags |= 1 << int(getattr(creation, preference))
    return flags


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, profile: TokenProfile = TokenProfile(*DEFAULT_PROFILE),
                 spec_hash: str | None = None, plugin_path: str | Path | None = None, aot: bool = True,
                 workspace_mib: int | None = None, verbose: bool = False, progress: bool = True) -> EngineManifest:
    """Parse, build and write `engine_path` and its manifest; return the manifest."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BackendError(f"no ONNX model at {onnx_path}")
    trt = require_tensorrt()
    require_cuda()
    # A bundle's plugin module is Python and runs here: its files are checked against the bundle's
    # manifest first. A --plugin-module outside a bundle runs as given (the caller vouches for it).
    verify_bundle(onnx_path)
    plugin = load_plugin_module(plugin_path)
    version = plugin.parse_version(trt.__version__)
    from ..onnx.external_data import load_model

    op_type = plugin_node(load_model(onnx_path), onnx_path).op_type
    quantized = op_type == plugin.QUANT_PLUGIN_OP
    if quantized:
        plugin.implementation_for(version, quantized=True)  # a TensorRT without Python plugins: say so first
    implementation = plugin.register_plugin(aot=aot)

    model = parser_model(onnx_path, aot=implementation == "aot")
    facts = onnx_facts(model)
    if spec_hash and facts["spec_hash"] and spec_hash != facts["spec_hash"]:
        raise BackendError(f"{onnx_path} was exported for spec hash {facts['spec_hash']}, not {spec_hash}")
    shapes = profile_shapes(facts["dims"], profile)

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, version, implementation))
    parser = trt.OnnxParser(network, logger)
    # External weights are found relative to `path`; the graph itself comes from the marked copy.
    if not parser.parse(model.SerializeToString(), str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if progress and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = make_progress_monitor(trt)
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if not strongly_typed and facts["dtype"] == "float16":
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT < 9.2 has no strongly typed networks
    optimisation = builder.create_optimization_profile()
    optimisation.set_shape(facts["input"], *shapes)
    config.add_optimization_profile(optimisation)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendError(f"TensorRT failed to build an engine from {onnx_path} (run with -v for its log)")
    payload = bytes(serialized)
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(payload))
    manifest = EngineManifest(
        spec_hash=spec_hash or facts["spec_hash"], tensorrt_version=trt.__version__,
        profiles=[{"input": facts["input"], "min": profile.min, "opt": profile.opt, "max": profile.max}],
        plugin={"name": op_type, "namespace": plugin.PLUGIN_NAMESPACE, "implementation": implementation,
                "module": str(Path(plugin.__file__).resolve())},
        dtype=facts["dtype"], inputs=[facts["input"]], outputs=facts["outputs"], engine=engine_path.name,
        notes=["tokens go in the profile's token dim; the runner folds [B,S,H] into [1,B*S,H]"],
        sha256={"engine": hashlib.sha256(payload).hexdigest(), "plugin_module": sha256_file(plugin.__file__)})
    write_manifest(engine_path, manifest)
    return manifest


# ------------------------------------------------------------------------------------------------
# command line


def finish_command(onnx_path: str | Path, engine_path: str | Path, profile: TokenProfile,
                   plugin_path: str | Path | None = None, spec_hash: str | None = None) -> str:
    """The exact command that builds the engine from a bundle (printed by the honest-absence path)."""
    parts = ["python", "-m", "moe_ir.backends.tensorrt.engine", str(onnx_path), "--profile", profile.text(),
             "-o", str(engine_path)]
    if plugin_path is not None:
        parts += ["--plugin-module", str(plugin_path)]
    if spec_hash:
        parts += ["--spec-hash", spec_hash]
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moe_ir.backends.tensorrt.engine",
                                 description="Build a TensorRT engine from a moe-ir plugin-flavour ONNX model.")
    ap.add_argument("onnx", help="the <name>.plugin.onnx written by `moe-ir build --backend tensorrt|onnx`")
    ap.add_argument("-o", "--output", required=True, help="engine file to write (a .json manifest goes beside it)")
    ap.add_argument("--profile", default=",".join(map(str, DEFAULT_PROFILE)),
                    help="MIN,OPT,MAX token counts of the optimisation profile (default %(default)s)")
    ap.add_argument("--plugin-module", default=None,
                    help="plugin.py to register (default: the installed one). It is Python and runs here: trust it "
                         "like code; a bundle's copy is checked against the bundle manifest's sha256 first")
    ap.add_argument("--spec-hash", default=None, help="spec hash to record (default: the ONNX metadata's)")
    ap.add_argument("--jit", action="store_true", help="use the Python @impl plugin even where AOT is available")
    ap.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit in MiB")
    ap.add_argument("-v", "--verbose", action="store_true", help="TensorRT's verbose log")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = ap.parse_args(argv)
    try:
        manifest = build_engine(args.onnx, args.output, profile=TokenProfile.parse(args.profile),
                                spec_hash=args.spec_hash, plugin_path=args.plugin_module, aot=not args.jit,
                                workspace_mib=args.workspace_mib, verbose=args.verbose, progress=not args.quiet)
    except MoeIRError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote {args.output} and {manifest_path(args.output).name} (TensorRT {manifest.tensorrt_version}, "
          f"plugin {manifest.plugin['implementation']}, {manifest.dtype}, tokens {TokenProfile.parse(args.profile).text()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
