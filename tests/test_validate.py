"""moe_ir.validate: reports, tolerances, routing flips with margins, and the CLI exit code."""
from __future__ import annotations

import json

import pytest
import torch

from moe_ir.backends import get_backend, resolve_backends
from moe_ir.backends.base import Backend
from moe_ir.backends.reference import ReferenceBackend
from moe_ir.cli import main
from moe_ir.spec import spec_from_dict
from moe_ir.validate import TOLERANCES, _compare, validate

SPEC_YAML = """\
name: tiny
hidden: 32
experts: {routed: 8, width: 16, top_k: 2, shared: 1}
router: {score: sigmoid, normalize: true, scaling: 2.0}
"""
SPEC = spec_from_dict({"name": "tiny", "hidden": 32, "experts": {"routed": 8, "width": 16, "top_k": 2, "shared": 1},
                       "router": {"score": "sigmoid", "normalize": True, "scaling": 2.0}})


class PerturbedBackend(Backend):
    """The reference, with one expert weight nudged: the kind of bug validation must catch."""

    name = "perturbed"
    summary = "reference with experts.w_down[0] scaled by 1.01"
    pipeline = ()

    def prepare(self, graph, weights, **options):
        broken = dict(weights)
        broken["experts.w_down"] = weights["experts.w_down"].clone()
        broken["experts.w_down"][0] *= 1.01
        return ReferenceBackend().prepare(graph, broken, dtype=torch.float32)


class Unsupported(ReferenceBackend):
    name = "never"

    def supports(self, graph):
        return False, "this backend supports nothing"


def test_report_ok_for_agreeing_backends():
    report = validate(SPEC, resolve_backends(["reference", "torch", "onnx:portable", "onnx:ort"]), tokens=32, seed=3)
    assert report.ok, report.to_table()
    assert [r.backend for r in report.results] == ["reference", "torch", "onnx:portable", "onnx:ort"]
    for r in report.results:
        assert r.routing.units == 32 and r.routing.flips == 0
        assert r.outputs["out"].max_abs < 1e-4 and r.outputs["weights"].ok
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert "onnx:ort" in report.to_table() and report.to_table().endswith("OK")


def test_perturbed_weight_is_a_mismatch():
    report = validate(SPEC, [get_backend("reference"), PerturbedBackend()], tokens=32)
    assert not report.ok
    ref, bad = report.results
    assert ref.ok and bad.status == "mismatch" and not bad.outputs["out"].ok
    assert bad.outputs["out"].max_abs > TOLERANCES["float32"][0]
    assert "MISMATCH" in report.to_table()


def test_unsupported_is_skipped_unless_named():
    assert validate(SPEC, [get_backend("reference"), Unsupported()], tokens=4).ok
    strict = validate(SPEC, [get_backend("reference"), Unsupported()], tokens=4, strict_support=True)
    assert not strict.ok and strict.results[1].status == "skipped"
    assert "supports nothing" in strict.to_table()


def test_flip_margins_near_tie_vs_real_flip():
    ref = {"out": torch.zeros(1, 3, 4, dtype=torch.float64), "expert_idx": torch.tensor([[0, 1], [2, 3], [4, 5]]),
           "weights": torch.full((3, 2), 0.5, dtype=torch.float64)}
    got = {"out": ref["out"].clone().float(), "expert_idx": torch.tensor([[0, 1], [2, 7], [4, 5]]),
           "weights": ref["weights"].clone().float()}
    got["out"][0, 1] += 1.0  # token 1 differs a lot: it took another expert
    near = _compare("x", got, ref, {"token": torch.tensor([0.3, 1e-7, 0.2], dtype=torch.float64)}, "float32")
    assert near.ok and near.routing.flips == 1 and near.routing.near_ties == 1 and near.routing.excluded_tokens == 1
    assert near.routing.margins == [pytest.approx(1e-7)]
    real = _compare("x", got, ref, {"token": torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)}, "float32")
    assert not real.ok and real.reason == "routing differs beyond near-ties"


def test_cli_exit_codes(tmp_path, capsys, monkeypatch):
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(SPEC_YAML)
    assert main(["validate", str(spec_path), "--backends", "reference", "onnx:plugin", "--tokens", "8"]) == 0
    assert "onnx:plugin" in capsys.readouterr().out
    assert main(["validate", str(spec_path), "--backends", "torch", "--tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    import moe_ir.backends.registry as registry

    real = registry.get_backend
    monkeypatch.setattr(registry, "get_backend", lambda label: PerturbedBackend() if label == "torch" else real(label))
    assert main(["validate", str(spec_path), "--backends", "reference", "torch", "--tokens", "8"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_unavailable_backend_is_skipped_but_a_failing_one_is_an_error():
    """BackendUnavailable (this machine lacks something) skips; any other BackendError is a failure."""
    from moe_ir.errors import BackendError, BackendUnavailable
    from moe_ir.frontends import load_spec
    from moe_ir.validate import validate

    from conftest import SPECS

    class Raising(Backend):
        summary = "raises in prepare (test only)"

        def __init__(self, name, error):
            self.name = name
            self.error = error

        def prepare(self, graph, weights, **options):
            raise self.error

    spec = load_spec(SPECS / "tiny.yaml")
    report = validate(spec, [Raising("absent", BackendUnavailable("needs a GPU that is not installed")),
                             Raising("broken", BackendError("lowering failed"))], tokens=4)
    status = {r.backend: (r.status, r.ok) for r in report.results}
    assert status == {"absent": ("skipped", True), "broken": ("error", False)}
    assert not report.ok


def test_empty_input_is_a_usage_error(tmp_path, capsys):
    """--tokens 0 (or a negative count) used to end in a torch traceback from the comparison."""
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(SPEC_YAML)
    for flag, value in (("--tokens", "0"), ("--tokens", "-3"), ("--batch", "0")):
        assert main(["validate", str(spec_path), "--backends", "reference", flag, value]) == 2
        err = capsys.readouterr().err
        assert err.count("moe-ir: error:") == 1 and "must be at least 1" in err and "Traceback" not in err
