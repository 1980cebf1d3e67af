"""`--quantize` on build, validate and generate, and the accuracy report (quantized vs float) checked against
a hand computation."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from moe_ir.cli import main
from moe_ir.params import init_weights, save_weights
from moe_ir.builder import build_graph
from moe_ir.quantization import compare_outputs
from moe_ir.spec import spec_from_dict

LAYER_YAML = ("name: qcli\nhidden: 64\nexperts: {routed: 5, shared: 1, width: 32, top_k: 2}\n"
              "router: {score: softmax, normalize: true}\n")
MODEL_YAML = ("model:\n  name: qgen\n  vocab_size: 40\n  hidden: 32\n  layers: 2\n  first_dense: 1\n  dense_width: 32\n"
              "  attention: {kind: gqa, heads: 4, kv_heads: 2, head_dim: 8}\n"
              "moe:\n  experts: {routed: 4, shared: 1, width: 32, top_k: 2}\n")


def test_accuracy_numbers_by_hand():
    # one token, three classes: float logits [0, ln 2, 0] -> p = [1/4, 1/2, 1/4]; quantized [0, 0, 0] -> q = 1/3 each
    f = torch.tensor([[[0.0, math.log(2.0), 0.0]]], dtype=torch.float64)
    q = torch.zeros(1, 1, 3)
    routes_f = [torch.tensor([[0, 2], [1, 3]])]
    routes_q = [torch.tensor([[2, 0], [1, 2]])]  # the same set for token 0 (order differs), another for token 1
    acc = compare_outputs("logits", f, q, routes_f, routes_q)
    kl = 0.25 * math.log(0.25 * 3) + 0.5 * math.log(0.5 * 3) + 0.25 * math.log(0.25 * 3)
    assert acc.kl_mean == pytest.approx(kl, rel=1e-12) and acc.kl_max == pytest.approx(kl, rel=1e-12)
    assert acc.top1_agree == 0.0  # float picks class 1, the uniform quantized logits class 0
    assert acc.max_abs == pytest.approx(math.log(2.0)) and acc.mean_abs == pytest.approx(math.log(2.0) / 3)
    assert acc.relative == pytest.approx(1.0)
    assert (acc.routing_changed, acc.routing_units) == (1, 2)


def test_validate_quantize_reports_against_float(tmp_path, capsys):
    spec = tmp_path / "layer.yaml"
    spec.write_text(LAYER_YAML)
    assert main(["validate", str(spec), "--backends", "torch", "--quantize", "int4:32", "--tokens", "6",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["results"][0]["status"] == "ok"
    q = report["quantization"]
    assert q["output"] == "out" and q["routing_units"] == 6 and q["scheme"] == "int4:32"
    assert 0 < q["relative"] < 0.3 and q["top1_agree"] is None


def test_build_quantizes_a_float_weights_file(tmp_path, capsys):
    spec = tmp_path / "layer.yaml"
    spec.write_text(LAYER_YAML)
    graph = build_graph(spec_from_dict({"name": "qcli", "hidden": 64, "router": {"score": "softmax", "normalize": True},
                                        "experts": {"routed": 5, "shared": 1, "width": 32, "top_k": 2}}))
    floats = tmp_path / "float.safetensors"
    save_weights(init_weights(graph, 4), floats)
    out = tmp_path / "out"
    assert main(["build", str(spec), "--backend", "torch", "-o", str(out), "--weights", str(floats),
                 "--quantize", "int8:16:asym"]) == 0
    err = capsys.readouterr().err
    assert "quantization error per tensor (int8:16:asym)" in err and "experts.w_down" in err
    written = load_file(str(out / "weights.safetensors"))
    assert written["experts.w_up.qweight"].dtype == torch.uint8 and "experts.w_up.zeros" in written
    assert "experts.w_up" not in written
    assert "format: int8" in (out / "spec.yaml").read_text()


def test_generate_quantize(tmp_path, capsys):
    spec = tmp_path / "model.yaml"
    spec.write_text(MODEL_YAML)
    assert main(["generate", str(spec), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--quantize", "int4:32",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) >= 3


def test_quantize_option_errors(tmp_path, capsys):
    spec = tmp_path / "layer.yaml"
    spec.write_text(LAYER_YAML)
    assert main(["validate", str(spec), "--quantize", "int4:24"]) == 2
    assert "neither a block size" in capsys.readouterr().err
    spec.write_text(LAYER_YAML + "quantization: {format: int8}\n")
    assert main(["validate", str(spec), "--quantize", "int4"]) == 2
    assert "already has a quantization section" in capsys.readouterr().err


def test_shrunk_model_keeps_its_quantization(tmp_path, capsys):
    spec = tmp_path / "model.yaml"
    spec.write_text(MODEL_YAML)
    assert main(["validate", str(spec), "--shrink", "16", "--quantize", "int8:16", "--backends", "torch",
                 "--generate", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quantization"]["scheme"] == "int8:16" and report["quantization"]["top1_agree"] is not None


def test_inspect_counts_a_quantized_model_like_its_float_form(tmp_path, capsys):
    spec = tmp_path / "model.yaml"
    spec.write_text(MODEL_YAML)
    assert main(["inspect", str(spec), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    spec.write_text(MODEL_YAML + "quantization: {format: int4, block: 16, weights: {embeddings: true, head: true}}\n")
    assert main(["inspect", str(spec), "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert quantized["total_params"] == plain["total_params"] > 0


def test_generate_with_quantized_embeddings_and_head(tmp_path, capsys):
    spec = tmp_path / "model.yaml"
    spec.write_text(MODEL_YAML + "quantization: {format: int8, block: 16, weights: {embeddings: true, head: true}}\n")
    assert main(["generate", str(spec), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) >= 3


def test_generate_int4_bf16_activations_is_an_explicit_opt_in(tmp_path, capsys, monkeypatch):
    from moe_ir.backends.torch_eager import backend as eager

    spec = tmp_path / "model.yaml"
    spec.write_text(MODEL_YAML)
    seen = []
    prepare = eager.TorchBackend.prepare

    def spy(self, graph, weights, **options):
        seen.append(options.get("int4_activations"))
        return prepare(self, graph, weights, **options)

    monkeypatch.setattr(eager.TorchBackend, "prepare", spy)
    args = ["generate", str(spec), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json", "--quantize", "int4:32"]
    assert main(args) == 0
    exact = json.loads(capsys.readouterr().out)["tokens"]
    assert main(args + ["--int4-activations", "bf16"]) == 0
    assert seen == [None, "bf16"]
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) == len(exact[0])
    assert main(args[:-1] + ["int8:32", "--int4-activations", "bf16"]) != 0
    assert "no weight is int4 with a block of 32..256" in capsys.readouterr().err
    assert main(args + ["--int4-activations", "bf16", "--backend", "compile"]) != 0
    assert "option of the torch backend" in capsys.readouterr().err


def test_int8_activations_on_the_command_line(tmp_path, capsys):
    """build --flavour ort --int4-activations int8 writes QMoE at accuracy level 4 and says so; the option is
    refused, before any work, for another flavour or backend and without int4/int8 weights; generate takes it
    on onnx:ort only."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    spec = tmp_path / "layer.yaml"
    spec.write_text(LAYER_YAML)
    out = tmp_path / "ort"
    assert main(["build", str(spec), "--backend", "onnx", "--flavour", "ort", "-o", str(out), "--quantize", "int4:16",
                 "--int4-activations", "int8"]) == 0
    assert "on int8 activations" in capsys.readouterr().out  # the build's notes
    model = onnx.load(str(out / "qcli.ort.onnx"))
    (qmoe,) = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert {a.name: a.i for a in qmoe.attribute}["accuracy_level"] == 4
    assert main(["build", str(spec), "--backend", "onnx", "-o", str(tmp_path / "p"), "--quantize", "int4:16",
                 "--int4-activations", "int8"]) == 2
    assert "add --flavour ort" in capsys.readouterr().err and not (tmp_path / "p").exists()
    assert main(["build", str(spec), "--backend", "onnx:ort", "-o", str(tmp_path / "f"), "--int4-activations",
                 "int8"]) == 2  # refused before any weight is made
    assert "needs int4 or int8 weights" in capsys.readouterr().err and not (tmp_path / "f").exists()
    model_spec = tmp_path / "model.yaml"
    model_spec.write_text(MODEL_YAML)
    args = ["generate", str(model_spec), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--json",
            "--quantize", "int4:32", "--int4-activations", "int8"]
    assert main(args + ["--backend", "onnx:ort"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) >= 3
    assert main(args) == 2
    assert "option of --backend onnx:ort" in capsys.readouterr().err
    float_args = [a for a in args if a not in ("--quantize", "int4:32")]
    assert main(float_args + ["--backend", "onnx:ort"]) == 2
    assert "need int4 or int8 weights" in capsys.readouterr().err
