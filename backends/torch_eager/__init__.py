"""Eager PyTorch backend: an IR graph lowered to a trainable nn.Module, and standalone source generation."""
from .backend import TorchBackend, make_runner
from .codegen import generate_source
from .module import OP_TABLE, MoELayer, MoEOutput

__all__ = ["MoELayer", "MoEOutput", "OP_TABLE", "TorchBackend", "generate_source", "make_runner"]
