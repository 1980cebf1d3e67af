"""Every shipped layer spec validates across the backends that support it.

Published layers are too large to hold here (DeepSeek-V3's is 11.3B parameters), so each is checked as its
miniature (`moe-ir validate --shrink 64`): the same expert counts, top-k, router, balance and capacity,
with hidden 64 and scaled widths. Routing semantics, which is where backends differ, is unchanged.
AOTInductor and torch.compile take tens of seconds per compile on 2 cores, and longer the more experts a
layer has (a 256-expert layer takes minutes), so they run on two small specs that cover both dispatch paths
(dropless group-limited sigmoid routing with bias, and capacity dropping by position), not on all.
"""
import pytest

from moe_ir.frontends import load_spec
from moe_ir.spec import miniature
from moe_ir.backends import resolve_backends
from moe_ir.validate import validate

from conftest import SPEC_FILES, SPECS

FAST_BACKENDS = ["reference", "torch", "onnx:portable", "onnx:ort", "onnx:plugin", "triton"]
# What each shipped spec must be supported by (the rest may be skipped with a reason).
ALWAYS = {"reference", "torch", "onnx:portable"}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_shipped_spec_validates_on_every_fast_backend(path):
    spec = miniature(load_spec(path), 64)
    report = validate(spec, resolve_backends(FAST_BACKENDS), tokens=24, batch=2, seed=1)
    assert report.ok, report.to_table()
    ran = {r.backend for r in report.results if r.status == "ok"}
    assert ALWAYS <= ran, report.to_table()
    for r in report.results:
        if r.status == "skipped":
            assert r.reason, f"{r.backend} skipped without a reason"


@pytest.mark.parametrize("name", ["tiny-v3", "gshard-top2"])
def test_compiled_backends_on_representative_specs(name):
    spec = miniature(load_spec(SPECS / f"{name}.yaml"), 64)
    report = validate(spec, resolve_backends(["aoti", "compile"]), tokens=16, seed=2, strict_support=True)
    assert report.ok, report.to_table()
