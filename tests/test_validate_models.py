"""Whole-model validation: logits and every MoE layer's routing against the reference, the near-tie rule
that leaves out the rest of a sequence after a flip, miniature model specs, and the CLI on a model spec."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_ir.backends.base import Backend
from moe_ir.backends.reference import ReferenceBackend
from moe_ir.cli import main
from moe_ir.frontends import load_model_spec
from moe_ir.model_builder import build_model_graph
from moe_ir.model_spec import AttentionKind, miniature_model
from moe_ir.backends import get_backend
from moe_ir.validate import TOLERANCES, _compare_model, validate_model

MODEL_SPECS = sorted(Path(__file__).resolve().parents[1].joinpath("specs", "models").glob("*.yaml"))


def _mini(name: str, hidden: int = 32):
    return miniature_model(load_model_spec(Path(__file__).resolve().parents[1] / "specs" / "models" / name), hidden)


class PerturbedHead(Backend):
    """The reference with the LM head nudged: logits off, routing untouched."""

    name = "perturbed-head"
    pipeline = ()

    def prepare(self, graph, weights, **options):
        broken = dict(weights)
        key = "lm_head.weight" if "lm_head.weight" in weights else "embed.weight"
        broken[key] = weights[key] * 1.01
        return ReferenceBackend().prepare(graph, broken, dtype=torch.float32)


class PerturbedRouter(Backend):
    """The reference with one MoE layer's router rotated: routing of that layer (and all after it) differs."""

    name = "perturbed-router"
    pipeline = ()

    def prepare(self, graph, weights, **options):
        broken = dict(weights)
        key = next(k for k in weights if k.endswith("moe.router.weight"))
        broken[key] = weights[key].roll(1, dims=0)
        return ReferenceBackend().prepare(graph, broken, dtype=torch.float32)


@pytest.mark.parametrize("spec_file", MODEL_SPECS, ids=lambda p: p.stem)
def test_miniature_keeps_the_structure(spec_file):
    spec = load_model_spec(spec_file)
    mini = miniature_model(spec, 64)
    m, a = mini.model, mini.model.attention
    assert m.hidden == 64 and m.vocab_size <= 128 and m.layers <= 3
    assert a.kind == spec.model.attention.kind and a.qk_norm == spec.model.attention.qk_norm
    assert a.qkv_bias == spec.model.attention.qkv_bias and m.tied_embeddings == spec.model.tied_embeddings
    assert (a.q_lora_rank is None) == (spec.model.attention.q_lora_rank is None)
    if a.kind == AttentionKind.GQA:
        assert a.heads // a.kv_heads == spec.model.attention.heads // spec.model.attention.kv_heads
    assert len(m.moe_layers) == 2 and (m.first_dense > 0) == (spec.model.first_dense > 0)
    e, e0 = mini.moe.experts, spec.moe.experts
    assert (e.routed, e.shared, e.top_k, e.shared_gate) == (e0.routed, e0.shared, e0.top_k, e0.shared_gate)
    assert mini.moe.router == spec.moe.router and mini.moe.balance == spec.moe.balance
    build_model_graph(mini, routing=True)  # verifies


def test_reference_agrees_with_itself_and_reports_every_layer():
    spec = _mini("deepseek-v3.yaml")
    report = validate_model(spec, [get_backend("reference")], tokens=12, batch=2, seed=1)
    assert report.ok, report.to_table()
    (r,) = report.results
    # two MoE layers x 24 tokens compared
    assert r.routing.units == 2 * 24 and r.routing.flips == 0
    assert r.outputs["logits"].max_abs == 0.0 and r.outputs["weights"].ok
    data = json.loads(report.to_json())
    assert data["results"][0]["outputs"]["logits"]["ok"] is True
    assert "logits abs" in report.to_table()


def test_perturbed_head_is_a_logits_mismatch_with_routing_intact():
    report = validate_model(_mini("mixtral-8x7b.yaml"), [get_backend("reference"), PerturbedHead()], tokens=8)
    ref, bad = report.results
    assert ref.ok and not report.ok
    assert bad.status == "mismatch" and not bad.outputs["logits"].ok and bad.routing.flips == 0
    assert bad.outputs["logits"].max_abs > TOLERANCES["float32"][0]


def test_perturbed_router_is_a_routing_mismatch():
    report = validate_model(_mini("olmoe-1b-7b.yaml"), [PerturbedRouter()], tokens=8)
    (bad,) = report.results
    assert bad.status == "mismatch" and bad.routing.flips > bad.routing.near_ties
    assert bad.reason == "routing differs beyond near-ties"


def _fake_outputs(seq_len: int, batch: int = 2, k: int = 2):
    t = batch * seq_len
    idx = torch.arange(t * k).reshape(t, k) % 8
    ref = {"logits": torch.randn(batch, seq_len, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),
           "layers.0.expert_idx": idx.clone(), "layers.0.weights": torch.full((t, k), 0.5, dtype=torch.float64),
           "layers.1.expert_idx": idx.clone(), "layers.1.weights": torch.full((t, k), 0.5, dtype=torch.float64)}
    got = {key: v.clone() for key, v in ref.items()}
    return ref, got


def test_near_tie_flip_excludes_the_rest_of_that_sequence_only():
    seq = 4
    ref, got = _fake_outputs(seq)
    # layer 0, token 1 of sequence 0 flips on a near-tie; its later positions then differ downstream
    got["layers.0.expert_idx"][1] = torch.tensor([6, 7])
    got["layers.1.expert_idx"][2] = torch.tensor([3, 3])   # a downstream consequence at position 2
    got["logits"][0, 1:] += 1.0                              # positions 1..3 of sequence 0 differ
    margins = {"layers.0.expert_idx": torch.full((8,), 0.5, dtype=torch.float64),
               "layers.1.expert_idx": torch.full((8,), 0.5, dtype=torch.float64)}
    margins["layers.0.expert_idx"][1] = 1e-7
    res = _compare_model("x", got, ref, margins, "float32", seq)
    assert res.ok, res
    assert res.routing.flips == 1 and res.routing.near_ties == 1 and res.routing.excluded_tokens == 3
    assert res.routing.units == 8 + 5  # layer 1 compares only the tokens still clean
    # the same flip with a real margin is a mismatch
    margins["layers.0.expert_idx"][1] = 0.5
    res = _compare_model("x", got, ref, margins, "float32", seq)
    assert res.status == "mismatch" and res.reason == "routing differs beyond near-ties"


def test_logits_error_in_an_untouched_sequence_still_fails():
    seq = 4
    ref, got = _fake_outputs(seq)
    got["layers.0.expert_idx"][1] = torch.tensor([6, 7])
    got["logits"][1, 0] += 1.0  # sequence 1 had no flip: this error must count
    margins = {key: torch.full((8,), 0.5, dtype=torch.float64) for key in ref if key.endswith("expert_idx")}
    margins["layers.0.expert_idx"][1] = 1e-7
    res = _compare_model("x", got, ref, margins, "float32", seq)
    assert res.status == "mismatch" and not res.outputs["logits"].ok


def test_missing_output_is_an_error():
    ref, got = _fake_outputs(4)
    del got["layers.1.expert_idx"]
    res = _compare_model("x", got, ref, {}, "float32", 4)
    assert res.status == "error" and "layers.1.expert_idx" in res.reason


def test_cli_validates_a_model_spec_with_shrink(capsys):
    spec = Path(__file__).resolve().parents[1] / "specs" / "models" / "qwen1.5-moe-a2.7b.yaml"
    rc = main(["validate", str(spec), "--shrink", "32", "--tokens", "6", "--backends", "reference", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["ok"] and out["spec"] == "qwen1.5-moe-a2.7b-h32"
    assert out["results"][0]["routing"]["units"] == 2 * 6


def test_cli_model_spec_too_large_is_refused_with_a_hint(capsys):
    spec = Path(__file__).resolve().parents[1] / "specs" / "models" / "deepseek-v3.yaml"
    rc = main(["validate", str(spec), "--backends", "reference"])
    err = capsys.readouterr().err
    assert rc != 0 and "--shrink" in err and len(err.strip().splitlines()) == 1
