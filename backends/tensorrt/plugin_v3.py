"""`moe_ir::FusedMoE` as an IPluginV3 class, for TensorRT versions without `tensorrt.plugin` (before 10.6).

The class implements IPluginV3OneCore/OneBuild/OneRuntime and its creator IPluginCreatorV3One, the
interfaces TensorRT's Python bindings expose for plugins written in Python. It shares everything but the
TensorRT plumbing with plugin.py: attribute decoding (`MoEConfig.from_fields`), dtype rules
(`output_dtypes`) and the computation (`compute_fused_moe`). Attributes round-trip through
`get_fields_to_serialize` and the creator, so a deserialised engine rebuilds the same configuration.
Importing this module needs TensorRT; plugin.py's `register_plugin` imports it only for versions < 10.6.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorrt as trt
import torch

from .plugin import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    PLUGIN_NAMESPACE,
    PLUGIN_OP,
    PLUGIN_VERSION,
    MoEConfig,
    PluginError,
    compute_fused_moe,
    output_dtypes,
    plugin_fields,
    trt_dtype_name,
)

_FIELD_TYPES = {"scale": trt.PluginFieldType.FLOAT32}  # every other attribute is an INT32 field
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}
_TRT_BY_NAME = {"float32": trt.float32, "float16": trt.float16, "int32": trt.int32}
if hasattr(trt, "bfloat16"):
    _TRT_BY_NAME["bfloat16"] = trt.bfloat16


def _device_tensor(address: int, dims: Any, dtype_name: str) -> torch.Tensor:
    """A contiguous torch view of TensorRT-owned device memory (2-byte types viewed as int16 first,
    since __cuda_array_interface__ has no bfloat16)."""
    torch_dtype = _TORCH[dtype_name]
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    carrier = {2: "<i2", 4: "<i4"}[itemsize]

    class _Interface:
        __cuda_array_interface__ = {"shape": tuple(dims), "typestr": carrier, "data": (address, False),
                                    "version": 3, "strides": None}

    return torch.as_tensor(_Interface(), device="cuda").view(torch_dtype)


class FusedMoEPluginV3(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
    def __init__(self, config: MoEConfig, phase: Any = None):
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.plugin_name = PLUGIN_OP
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        self.num_outputs = len(OUTPUT_NAMES)
        self.timing_cache_id = ""
        self.config = config
        self.phase = phase

    # -- core
    def get_capability_interface(self, capability_type):
        return self

    def clone(self):
        return FusedMoEPluginV3(self.config, self.phase)

    def get_fields_to_serialize(self):
        return trt.PluginFieldCollection([trt.PluginField(name, array, getattr(trt.PluginFieldType, kind))
                                          for name, array, kind in plugin_fields(self.config)])

    # -- build
    def get_output_data_types(self, input_types, ranks=None):
        if len(input_types) != len(INPUT_NAMES):
            raise PluginError(f"{PLUGIN_OP} takes {len(INPUT_NAMES)} inputs ({', '.join(INPUT_NAMES)}), "
                              f"got {len(input_types)}")
        names = output_dtypes(*(trt_dtype_name(t) for t in input_types))
        return [input_types[0], _TRT_BY_NAME[names[1]], _TRT_BY_NAME[names[2]]]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        tokens, hidden = inputs[0][0], inputs[0][1]
        k = expr_builder.constant(self.config.top_k)
        out = trt.DimsExprs(2)
        out[0], out[1] = tokens, hidden
        routing = trt.DimsExprs(2)
        routing[0], routing[1] = tokens, k
        record = trt.DimsExprs(2)
        record[0], record[1] = tokens, k
        return [out, routing, record]

    def supports_format_combination(self, pos, in_out, num_inputs):
        desc = in_out[pos].desc
        if desc.format != trt.TensorFormat.LINEAR:
            return False
        x_type = in_out[0].desc.type
        if pos == 0:
            return trt_dtype_name(desc.type) in ("float32", "float16", "bfloat16")
        expected = {1: trt.float32, 2: trt.float32, 3: x_type, 4: x_type, 5: x_type, 6: trt.int32, 7: trt.float32}
        return desc.type == expected[pos]

    def configure_plugin(self, inputs, outputs):
        pass

    def get_workspace_size(self, inputs, outputs):
        return 0

    def get_valid_tactics(self):
        return []

    # -- runtime
    def on_shape_change(self, inputs, outputs):
        pass

    def set_tactic(self, tactic):
        pass

    def attach_to_context(self, context):
        return self.clone()

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        args = [_device_tensor(address, desc.dims, trt_dtype_name(desc.type))
                for address, desc in zip(inputs, input_desc)]
        results = [_device_tensor(address, desc.dims, trt_dtype_name(desc.type))
                   for address, desc in zip(outputs, output_desc)]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            for target, value in zip(results, compute_fused_moe(*args, self.config)):
                target.copy_(value)
        return 0


class FusedMoEPluginCreatorV3(trt.IPluginCreatorV3One):
    def __init__(self):
        trt.IPluginCreatorV3One.__init__(self)
        self.name = PLUGIN_OP
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = PLUGIN_VERSION
        names = ("score_fn", "top_k", "n_group", "topk_group", "group_score", "normalize", "scale", "activation")
        self.field_names = trt.PluginFieldCollection(
            [trt.PluginField(n, np.array([]), _FIELD_TYPES.get(n, trt.PluginFieldType.INT32)) for n in names])

    def create_plugin(self, name, field_collection, phase):
        # The ONNX parser also forwards its own routing attributes; only the op's fields are read.
        fields = {f.name: np.asarray(f.data) for f in field_collection}
        return FusedMoEPluginV3(MoEConfig.from_fields(fields), phase)


def register_creator() -> None:
    trt.get_plugin_registry().register_creator(FusedMoEPluginCreatorV3(), PLUGIN_NAMESPACE)
