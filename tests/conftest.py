"""Shared fixtures. TRITON_INTERPRET must be set before triton is first imported, so it is set here:
on machines without a GPU every Triton kernel in the suite runs in the interpreter (slow, exact)."""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent
SPECS = REPO / "specs"
SPEC_FILES = sorted(SPECS.glob("*.yaml"))


@pytest.fixture(scope="session")
def spec_dir() -> Path:
    return SPECS
