"""Load a moe-ir TensorRT engine and run it on torch CUDA tensors.

The manifest beside the engine is read first: it must match the spec hash (when given) and this machine's
TensorRT version, and the engine (and a bundle's plugin module) the sha256 it records. An engine and its
plugin module are code that runs at load: load only engines you built or trust like code. The plugin is registered before deserialising, because an engine with a Python (@impl)
plugin calls back into it; an AOT plugin's kernel is inside the engine and needs nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_ir.errors import BackendError
from .engine import (EngineManifest, check_engine_files, load_manifest, load_plugin_module, require_cuda,
                     require_tensorrt)

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
                 "INT64": torch.int64}
# The graph's output names and the names the validation harness compares.
ROUTING_OUTPUTS = {"out": "out", "expert_idx": "expert_idx", "weights": "weights"}


class EngineRunner:
    """runner(x [B,S,H] or [T,H]) -> {"out", "expert_idx", "weights"} (CUDA tensors)."""

    def __init__(self, engine_path: str | Path, *, spec_hash: str | None = None):
        trt = require_tensorrt()
        require_cuda()
        self.engine_path = Path(engine_path)
        self.manifest: EngineManifest = load_manifest(engine_path, spec_hash=spec_hash, tensorrt_version=trt.__version__)
        # An engine and its plugin module are code: both are checked against the manifest's sha256 before
        # the module runs or TensorRT deserialises the engine (a damaged engine could crash the process).
        plugin = load_plugin_module(check_engine_files(self.manifest, self.engine_path))
        plugin.register_plugin(aot=self.manifest.plugin.get("implementation") == "aot")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialise {engine_path}; rebuild it")
        self.context = self.engine.create_execution_context()
        self._trt = trt
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1:
            raise BackendError(f"{engine_path}: expected one input, found {self.inputs}")
        self._input_rank = len(self.engine.get_tensor_shape(self.inputs[0]))
        profile = self.manifest.profiles[0]
        self.max_tokens = int(profile["max"])
        self.min_tokens = int(profile["min"])

    def _dtype(self, name: str) -> torch.dtype:
        dtype = self.engine.get_tensor_dtype(name)
        key = getattr(dtype, "name", str(dtype)).split(".")[-1]
        if key not in _TORCH_DTYPES:
            raise BackendError(f"{self.engine_path}: tensor {name} has unsupported dtype {dtype}")
        return _TORCH_DTYPES[key]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        lead = x.shape[:-1]
        tokens = int(torch.tensor(lead).prod().item()) if len(lead) else 1
        if not self.min_tokens <= tokens <= self.max_tokens:
            raise BackendError(f"{tokens} tokens are outside the engine's profile "
                               f"{self.min_tokens}..{self.max_tokens}; rebuild with a wider --profile")
        name = self.inputs[0]
        # Token-wise layer: [B,S,H] runs as [1,B*S,H] (the profile's shape), [T,H] as is.
        shape = (1, tokens, x.shape[-1]) if self._input_rank == 3 else (tokens, x.shape[-1])
        feed = x.reshape(shape).to(device="cuda", dtype=self._dtype(name)).contiguous()
        self.context.set_input_shape(name, shape)
        self.context.set_tensor_address(name, feed.data_ptr())
        results: dict[str, torch.Tensor] = {}
        for out_name in self.outputs:
            out_shape = tuple(self.context.get_tensor_shape(out_name))
            buffer = torch.empty(out_shape, dtype=self._dtype(out_name), device="cuda")
            self.context.set_tensor_address(out_name, buffer.data_ptr())
            results[out_name] = buffer
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError(f"TensorRT execution of {self.engine_path} failed")
        stream.synchronize()
        named = {ROUTING_OUTPUTS.get(k, k): v for k, v in results.items()}
        if "out" in named:
            named["out"] = named["out"].reshape(*lead, x.shape[-1])
        if "expert_idx" in named:
            named["expert_idx"] = named["expert_idx"].long()
        return named


def load_engine(engine_path: str | Path, *, spec_hash: str | None = None) -> EngineRunner:
    return EngineRunner(engine_path, spec_hash=spec_hash)


def describe(runner: EngineRunner) -> dict[str, Any]:
    return {"engine": str(runner.engine_path), "inputs": runner.inputs, "outputs": runner.outputs,
            "tensorrt": runner.manifest.tensorrt_version, "plugin": runner.manifest.plugin}
