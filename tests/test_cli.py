"""The CLI end to end: reports, JSON keys, and one-line errors with the documented exit codes."""
import json
import math
import re
import subprocess
import sys

import pytest

from moe_ir.cli import main

from conftest import SPEC_FILES, SPECS


def run_cli(*args, capsys):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_inspect_and_graph_work_for_every_shipped_spec(path, capsys):
    code, out, _ = run_cli("inspect", str(path), capsys=capsys)
    assert code == 0 and "total params" in out and "paper form" in out
    for fmt in ("text", "dot", "json"):
        code, out, _ = run_cli("graph", str(path), "--format", fmt, "--pipeline", "fused", capsys=capsys)
        assert code == 0 and out


def test_inspect_json_2b_layer(capsys):
    code, out, _ = run_cli("inspect", str(SPECS / "deepseekmoe-2b.yaml"), "--json", capsys=capsys)
    data = json.loads(out)
    assert code == 0
    assert data["explicit"]["routed"] == 63 and data["explicit"]["top_k"] == 7
    assert data["combinations"] == math.comb(63, 7)
    assert data["paper"] == {"N": 16, "F": 3456, "m": 4, "K": 2, "Ks": 1}
    # 64 experts of 3 x 1280 x 864 weights plus a 63 x 1280 router: counted by hand.
    assert data["total_params"] == 64 * 3 * 1280 * 864 + 63 * 1280
    assert data["activated_params"] == 8 * 3 * 1280 * 864 + 63 * 1280


def test_graph_after_stops_the_pipeline(capsys):
    code, out, _ = run_cli("graph", str(SPECS / "tiny.yaml"), "--pipeline", "fused", "--after",
                           "fuse-shared-experts", capsys=capsys)
    assert code == 0 and "fused_moe" not in out and "# pipeline: strip-training-outputs,fuse-shared-experts" in out


def test_schema_is_json(capsys):
    code, out, _ = run_cli("schema", capsys=capsys)
    assert code == 0 and json.loads(out)["title"] == "moe-ir MoE layer spec"


def test_bad_spec_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden: 32\nexperts: {routed: 8, width: 16, top_k: 2}\nrouter: {scroe: softmax}\n")
    proc = subprocess.run([sys.executable, "-m", "moe_ir.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml:3: router.scroe: unknown key" in lines[0] and "did you mean 'score'" in lines[0]


def test_unknown_backend_lists_the_known_ones(tmp_path, capsys):
    code, _, err = run_cli("build", str(SPECS / "tiny.yaml"), "--backend", "nope", "-o", str(tmp_path / "o"),
                           capsys=capsys)
    assert code == 2 and "unknown backend 'nope'; available: reference" in err
    assert not (tmp_path / "o").exists()


def test_build_refuses_weights_that_cannot_fit_in_memory(tmp_path, capsys, monkeypatch):
    import moe_ir.params as params

    monkeypatch.setattr(params, "_available_memory", lambda: 1 << 10)  # 1 KiB: less than the tiny layer's 50 KB
    code, _, err = run_cli("build", str(SPECS / "tiny.yaml"), "--backend", "reference", "-o", str(tmp_path / "o"),
                           capsys=capsys)
    assert code == 1
    assert "initialising random weights needs about 0.0 GiB for the weights of 'tiny' (12,512 parameters)" in err
    assert not (tmp_path / "o").exists()


def test_weights_nbytes_counts_declared_dtypes():
    from moe_ir.builder import build_graph
    from moe_ir.frontends import load_spec
    from moe_ir.params import weights_nbytes

    g = build_graph(load_spec(SPECS / "tiny.yaml"))
    assert weights_nbytes(g) == 4 * sum(v.type.shape[0] * (v.type.shape[1] if len(v.type.shape) > 1 else 1)
                                        * (v.type.shape[2] if len(v.type.shape) > 2 else 1)
                                        for v in g.weights.values())


def test_validate_cli_runs_triton_after_torch_compile_in_one_process():
    """A fresh process without TRITON_INTERPRET: torch.compile imports triton first, and the Triton backend
    must still run its kernels in the interpreter afterwards (moe_ir chooses the mode at import)."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "moe_ir.cli", "validate", str(SPECS / "tiny.yaml"), "--tokens", "4",
                           "--backends", "compile", "triton", "--json"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [r["status"] for r in report["results"]] == ["ok", "ok"]
    # Progress on stderr (stdout stays pure JSON): each backend when it starts and how it ended.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("validate: ")]
    assert lines[0] == "validate: compile: running (1/2)" and lines[2] == "validate: triton: running (2/2)"
    assert re.fullmatch(r"validate: compile: ok in \d+\.\ds", lines[1]), lines
    assert re.fullmatch(r"validate: triton: ok in \d+\.\ds", lines[3]), lines


def test_atomic_write_gives_artifacts_normal_permissions(tmp_path):
    import os

    from moe_ir.params import atomic_write

    path = atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("backend, option, value", [("torch", "--precision", "fp16"), ("torch", "--flavour", "ort"),
                                                    ("tensorrt", "--external-data", None)])
def test_build_refuses_options_the_backend_does_not_take(tmp_path, capsys, backend, option, value):
    out = tmp_path / "out"
    argv = ["build", str(SPECS / "tiny.yaml"), "--backend", backend, option, *([value] if value else []), "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"backend '{backend}' does not take {option}" in err and err.count("\n") == 1
    assert not out.exists()



def test_validate_dtype_choices_are_the_harness_tolerances():
    """The CLI states validate's dtypes itself (importing the harness would import torch for --help)."""
    from moe_ir.cli import VALIDATE_DTYPES
    from moe_ir.validate import NEAR_TIE, TOLERANCES

    assert set(VALIDATE_DTYPES) == set(TOLERANCES) == set(NEAR_TIE)
