"""ONNX export (portable | ort | plugin flavours) lowered from the IR, and ONNX Runtime runners."""
from .backend import EXTERNAL_DATA_THRESHOLD, OnnxBackend, load_runner, lowered_graph, write_model
from .lower import OPSET, PIPELINES, Flavour, LoweredModel, lower, supports

__all__ = ["EXTERNAL_DATA_THRESHOLD", "OPSET", "PIPELINES", "Flavour", "LoweredModel", "OnnxBackend", "load_runner",
           "lower", "lowered_graph", "supports", "write_model"]
