"""Triton kernels for the routed part of an MoE layer, as torch custom ops (namespace ``moe_ir``).

``route`` -> ``dispatch`` -> ``expert_ffn`` -> ``combine`` (``moe_forward`` chains them). Each has
a pure-torch ``*_reference`` with the same layouts. See ``kernels.py`` for the kernel design
(padding, where routing weights are applied) and ``ops.py`` for what runs on which device and
how gradients flow. Importing this package registers ``torch.ops.moe_ir.{route, dispatch,
expert_ffn, combine}``.

Device selection: on CUDA the kernels run natively. On a machine without CUDA, importing this
package turns on Triton's interpreter (``TRITON_INTERPRET=1``, for correctness, not speed) unless
``TRITON_INTERPRET`` was set explicitly; with ``TRITON_INTERPRET=0`` on a CPU the ops run their
torch implementations. Triton fixes compiled vs interpreted per ``@triton.jit`` function when
``kernels.py`` is imported, which is why the choice is made here, before that import.

``backend.py`` (``TritonBackend``, registry name "triton") lowers a fused IR graph onto these
ops; it is imported on its own (``moe_ir.backends.triton.backend``), not re-exported here.
"""
import os as _os
import sys as _sys


def _enable_interpreter_without_cuda() -> None:
    if "TRITON_INTERPRET" in _os.environ or f"{__name__}.kernels" in _sys.modules:
        return  # an explicit choice, or the kernels are already decorated: too late to change
    import torch

    if not torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"


_enable_interpreter_without_cuda()

from .ops import combine, dispatch, expert_ffn, moe_forward, route  # noqa: E402
from .reference import (  # noqa: E402
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
