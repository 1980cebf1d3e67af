"""Triton kernels for the routed part of an MoE layer, as torch custom ops (namespace ``moe_ir``).

``route`` -> ``dispatch`` -> ``expert_ffn`` -> ``combine`` (``moe_forward`` chains them). Each has
a pure-torch ``*_reference`` with the same layouts. See ``kernels.py`` for the kernel design
(padding, where routing weights are applied) and ``ops.py`` for what runs on which device and
how gradients flow. Importing this package registers ``torch.ops.moe_ir.{route, dispatch,
expert_ffn, combine}``; on CPU the Triton kernels run only with ``TRITON_INTERPRET=1`` set
before ``triton`` is first imported, otherwise the torch implementations run.
"""
from .ops import combine, dispatch, expert_ffn, moe_forward, route
from .reference import (
    combine_reference,
    dispatch_reference,
    expert_ffn_reference,
    moe_forward_reference,
    padded_size,
    route_reference,
)

__all__ = [
    "combine",
    "combine_reference",
    "dispatch",
    "dispatch_reference",
    "expert_ffn",
    "expert_ffn_reference",
    "moe_forward",
    "moe_forward_reference",
    "padded_size",
    "route",
    "route_reference",
]
