"""Eager PyTorch backend: an IR graph (one MoE layer, or a whole model) lowered to a trainable nn.Module,
and standalone source generation."""
from .backend import TorchBackend, make_runner
from .codegen import generate_source
from .module import GraphModule, ModelOutput, MoELayer, MoEModel, MoEOutput

__all__ = ["GraphModule", "ModelOutput", "MoELayer", "MoEModel", "MoEOutput", "TorchBackend",
           "generate_source", "make_runner"]
