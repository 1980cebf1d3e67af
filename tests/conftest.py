"""Shared fixtures. TRITON_INTERPRET must be set before triton is first imported, so it is set here:
on machines without a GPU every Triton kernel in the suite runs in the interpreter (slow, exact)."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
SPEC_FILES = sorted(SPECS.glob("*.yaml"))


def tiny_model_yaml(name: str, attention: str, *, layers: int = 2, first_dense: int = 1) -> str:
    """A model spec of odd sizes (vocabulary 61, hidden 24): `first_dense` dense layers, then MoE layers of
    5 routed + 1 shared experts; `attention` is a flow mapping such as "{kind: gqa, heads: 4, ...}"."""
    dense = f"  first_dense: {first_dense}\n  dense_width: 20\n" if first_dense else ""
    return (f"model:\n  name: {name}\n  vocab_size: 61\n  hidden: 24\n  layers: {layers}\n{dense}"
            f"  attention: {attention}\nmoe:\n  experts: {{routed: 5, shared: 1, width: 6, top_k: 2}}\n"
            "  router: {score: softmax, normalize: true}\n")


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPECS


def import_file(path: Path, name: str):
    """Import a standalone source file (a generated model.py) as a module of its own, outside moe_ir."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
