"""ONNX export (portable | ort | plugin flavours) lowered from the IR, and ONNX Runtime runners."""
from .backend import OnnxBackend, lowered_graph
from .emit import OPSET
from .flavours import (LOWERINGS, PIPELINES, OrtLowering, PluginLowering, PortableLowering, int8_activations_refusal,
                       lower, supports)
from .lowering import Flavour, Lowering
from .genai import check_genai_folder, genai_generate
from .runtime import Decoder, load_decoder, load_runner
from .weights import LoweredModel
from .writer import EXTERNAL_DATA_THRESHOLD, write_model

__all__ = ["EXTERNAL_DATA_THRESHOLD", "LOWERINGS", "OPSET", "PIPELINES", "Decoder", "Flavour", "LoweredModel",
           "Lowering", "OnnxBackend", "OrtLowering", "PluginLowering", "PortableLowering", "check_genai_folder",
           "genai_generate", "int8_activations_refusal", "load_decoder", "load_runner", "lower", "lowered_graph",
           "supports", "write_model"]
