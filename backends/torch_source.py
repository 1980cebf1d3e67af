"""Standalone copies of the torch kernel set, for files that must run where moe_ir is not installed (the
generated `model.py`, the TensorRT plugin module in a bundle).

The copied functions are the source text of the kernels (`torch_kernels`, one module per concern) and of the
op functions of `torch_ops.py`, verbatim (`inspect.getsource`), together with every function of theirs that
they call, so a copy runs the same instructions as the in-process backends. These modules keep their
functions torch-only and call each other by bare names for this reason.
"""
from __future__ import annotations

import dis
import inspect
from types import CodeType, FunctionType

from . import torch_kernels, torch_ops

# The imports every copied function may rely on (the kernels' modules and torch_ops.py import no more, besides
# each other).
HEADER_IMPORTS = ("import concurrent.futures", "import math", "import os", "import threading", "import warnings", "", "import torch", "import torch.nn.functional as F")


def _module_functions(module) -> dict[str, FunctionType]:
    return {name: obj for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__}


# Copyable functions by name, in the order a copy lists them: the kernels, then the op functions.
FUNCTIONS: dict[str, FunctionType] = {name: fn for module in (*torch_kernels.MODULES, torch_ops)
                                      for name, fn in _module_functions(module).items()}


def _globals_read(code: CodeType) -> set[str]:
    """Global names a function's code loads (nested comprehensions and lambdas included); attribute names
    such as `F.linear`'s `linear` do not count."""
    names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _globals_read(const)
    return names


# function -> the copyable functions it calls, read from its code (a hand-kept table goes stale)
_CALLS = {name: sorted(_globals_read(fn.__code__) & set(FUNCTIONS) - {name}) for name, fn in FUNCTIONS.items()}


def closure(names: set[str] | list[str]) -> list[str]:
    """`names` and every copyable function they call, in FUNCTIONS' order (so a copy reads like the source)."""
    unknown = sorted(set(names) - set(FUNCTIONS))
    if unknown:
        raise KeyError(f"not functions of torch_kernels / torch_ops.py: {', '.join(unknown)}")
    need = set(names)
    stack = list(need)
    while stack:
        for dep in _CALLS[stack.pop()]:
            if dep not in need:
                need.add(dep)
                stack.append(dep)
    return [name for name in FUNCTIONS if name in need]


def source_lines(names: list[str]) -> list[str]:
    """The functions' source text, verbatim, each followed by a blank line, for a module body."""
    out: list[str] = []
    for name in names:
        out.append("")
        out.append(inspect.getsource(FUNCTIONS[name]).rstrip())
        out.append("")
    return out
