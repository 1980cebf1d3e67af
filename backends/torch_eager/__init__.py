"""Eager PyTorch backend: an IR graph (one MoE layer, or a whole model) lowered to a trainable nn.Module,
and standalone source generation."""
from .backend import TorchBackend, make_runner
from .codegen import generate_source
from .model_codegen import generate_model_source
from .module import OP_TABLE, GraphModule, ModelOutput, MoELayer, MoEModel, MoEOutput

__all__ = ["GraphModule", "ModelOutput", "MoELayer", "MoEModel", "MoEOutput", "OP_TABLE", "TorchBackend",
           "generate_model_source", "generate_source", "make_runner"]
