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
# A two-layer model (one dense, one MoE) of odd sizes; format with name= and an attention= flow mapping.
TINY_MODEL_YAML = """\
model:
  name: {name}
  vocab_size: 61
  hidden: 24
  layers: 2
  first_dense: 1
  dense_width: 20
  attention: {attention}
moe:
  experts: {{routed: 5, shared: 1, width: 6, top_k: 2}}
  router: {{score: softmax, normalize: true}}
"""


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPECS


def import_file(path: Path, name: str):
    """Import a standalone source file (a generated model.py) as a module of its own, outside moe_ir."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
