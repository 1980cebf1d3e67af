"""ONNX export (portable | ort | plugin flavours) lowered from the IR, and ONNX Runtime runners."""
from .backend import OnnxBackend, lowered_graph
from .emit import OPSET
from .flavours import LOWERINGS, PIPELINES, OrtLowering, PluginLowering, PortableLowering, lower, supports
from .lowering import Flavour, Lowering
from .runtime import load_runner
from .weights import LoweredModel
from .writer import EXTERNAL_DATA_THRESHOLD, write_model

__all__ = ["EXTERNAL_DATA_THRESHOLD", "LOWERINGS", "OPSET", "PIPELINES", "Flavour", "LoweredModel", "Lowering",
           "OnnxBackend", "OrtLowering", "PluginLowering", "PortableLowering", "load_runner", "lower",
           "lowered_graph", "supports", "write_model"]
