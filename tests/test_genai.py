"""onnxruntime-genai loads what `moe-ir build --backend onnx --decoder` writes and generates the reference's
greedy tokens.

Oracles independent of the ONNX lowering and of GenAI: the reference interpreter's greedy tokens for spec
models, and transformers' own `generate` for checkpoints of the imported families (tiny random models saved
with `save_pretrained`, built from the checkpoint folder). GenAI pads a batch on the right (it reads the pad
token id from genai_config.json): the same prompts left-padded through moe-ir's loop must give the same tokens.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_ir.cli import main
from moe_ir.frontends import load_model_spec_text
from moe_ir.generation import greedy_generate, reference_step
from moe_ir.interpreter import interpret
from moe_ir.model_builder import GraphForm, build_model_graph
from moe_ir.params import init_weights

from conftest import tiny_model_yaml
from test_generation import ATTENTION

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'moe-ir[onnx]')")
transformers = pytest.importorskip("transformers")

from test_hf_checkpoints import random_model  # noqa: E402

VOCAB = 61
NEW_TOKENS = 5
# A GQA model, an MHA one, and MLA whose K and V heads have one size (qk_nope + qk_rope == v_head_dim: GenAI's
# cache has one head size), in the expanded layout GenAI caches; and a GQA model the ort flavour lowers with
# GroupQueryAttention (head_dim 16).
GENAI_ATTENTION = {
    "gqa": ATTENTION["gqa-head-norm"],
    "mha": ATTENTION["mha-bias"],
    "mla-even": "{kind: mla, heads: 2, kv_lora_rank: 8, qk_nope_head_dim: 6, qk_rope_head_dim: 4, v_head_dim: 10}",
    "gqa16-ort": "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 16, qk_norm: head, rope_theta: 500.0}",
}


def genai_tokens(folder, prompts: np.ndarray, new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of GenAI's Generator on `prompts` [B, S] (right-padded with the config's pad id)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompts.shape[1] + new_tokens, do_sample=False, batch_size=prompts.shape[0])
    generator = og.Generator(model, params)
    generator.append_tokens(prompts.astype(np.int32))
    steps = []
    while not generator.is_done():
        generator.generate_next_token()
        steps.append(generator.get_next_tokens().tolist())
    return np.array(steps).T.tolist()


def build_decoder(source, out, *extra) -> dict:
    assert main(["build", str(source), "--backend", "onnx", "--decoder", "-o", str(out), "--json", *extra]) == 0
    return out


@pytest.mark.parametrize("kind", sorted(GENAI_ATTENTION))
def test_genai_generates_the_reference_tokens_of_a_spec(kind, tmp_path, capsys):
    text = tiny_model_yaml(kind, GENAI_ATTENTION[kind])
    (tmp_path / "m.yaml").write_text(text)
    folder = build_decoder(tmp_path / "m.yaml", tmp_path / "out", "--flavour",
                           "ort" if kind.endswith("-ort") else "portable")
    report = json.loads(capsys.readouterr().out)
    assert [p["path"].rsplit("/", 1)[-1] for p in report["files"]] == ["model.onnx", "genai_config.json"]
    if kind.endswith("-ort"):
        assert "ort contrib ops: MoE x1, GroupQueryAttention x2, SkipSimplifiedLayerNormalization x4" in report["notes"]
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == 2

    spec = load_model_spec_text(text)
    graph = build_model_graph(spec, form=GraphForm.DECODE)
    weights = init_weights(build_model_graph(spec), 0)   # build's default: seed 0
    prompts = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0                                       # row 1: a prompt of 4 tokens, left-padded for moe-ir
    expected = greedy_generate(reference_step(graph, weights), graph, prompts, mask, max_new_tokens=NEW_TOKENS)
    right_padded = prompts.clone()
    right_padded[1] = torch.cat([prompts[1, 2:], torch.zeros(2, dtype=torch.int64)])   # pad id 0, on the right
    # A spec knows no end-of-sequence token: GenAI's stand-in is 0 (the build says so), where a row stops.
    assert any("token 0 stands in as eos and pad" in n for n in report["notes"])
    for got, want in ((genai_tokens(folder, right_padded.numpy()), expected.tokens.tolist()),
                      (genai_tokens(folder, prompts[:1].numpy()), expected.tokens[:1].tolist())):
        for row, ref in zip(got, want):
            stop = ref.index(0) + 1 if 0 in ref else len(ref)
            assert row[:stop] == ref[:stop]


def test_mla_latent_cache_has_no_genai_config_and_says_why(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(tiny_model_yaml("mla", ATTENTION["mla"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "genai_config.json").write_text("{}")   # an earlier build's: removed with this one
    build_decoder(tmp_path / "m.yaml", tmp_path / "out", "--mla-cache", "latent")
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx"]
    assert any("no genai_config.json written" in n and "c_kv [B, 1, L, 10] and k_rope [B, 1, L, 4]" in n
               for n in notes)
    # Expanded, this MLA's keys (6 + 4) and values (5) differ in size: refused with that reason.
    build_decoder(tmp_path / "m.yaml", tmp_path / "exp", "--mla-cache", "expanded")
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("keys [B, 3, L, 10] and values [B, 3, L, 5]" in n for n in notes)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_genai_generates_transformers_tokens_of_an_imported_checkpoint(family, tmp_path, capsys):
    model = random_model(family)
    model.config.eos_token_id = model.generation_config.eos_token_id = 60   # stop token GenAI must learn
    model.config.bos_token_id, model.config.pad_token_id = 1, 0
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text('{"version": "1.0"}')   # copied verbatim, not read
    folder = build_decoder(tmp_path / "ckpt", tmp_path / "out")
    report = json.loads(capsys.readouterr().out)
    assert (folder / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert any(n.startswith("copied from the checkpoint: tokenizer.json") for n in report["notes"])
    config = json.loads((folder / "genai_config.json").read_text())["model"]
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (60, 1, 0)
    assert config["decoder"]["num_key_value_heads"] == model.config.num_key_value_heads

    prompts = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)[:, 7:]
    got = genai_tokens(folder, prompts.numpy())
    # GenAI stops a row at eos (60); transformers here does not: compare up to GenAI's eos.
    for row, want in zip(got, expected.tolist()):
        stop = row.index(60) + 1 if 60 in row else len(row)
        assert row[:stop] == want[:stop]


def test_generate_cli_through_genai_equals_moe_ir_onnx_runner(tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(tiny_model_yaml("gqa", GENAI_ATTENTION["gqa"]))
    folder = build_decoder(tmp_path / "m.yaml", tmp_path / "out")
    capsys.readouterr()
    (tmp_path / "prompts.txt").write_text("5 17 3 60 9\n8 2 4\n")
    runs = {}
    for backend in ("genai", "onnx:portable"):
        assert main(["generate", str(folder), "--backend", backend, "--prompt-file", str(tmp_path / "prompts.txt"),
                     "--max-new-tokens", "6", "--json"]) == 0
        runs[backend] = json.loads(capsys.readouterr().out)["tokens"]
    # Both stop a row at the config's eos (the stand-in 0 here): row 2 ends there.
    assert runs["genai"] == runs["onnx:portable"] and runs["genai"][1][-1] == 0 and len(runs["genai"][0]) == 6
    # genai runs a built folder only.
    assert main(["generate", str(tmp_path / "m.yaml"), "--backend", "genai", "--prompt-ids", "1 2"]) == 2
    assert "--backend genai runs a built decoder folder" in capsys.readouterr().err


@pytest.mark.parametrize("change,needle", [
    (lambda d: d.update(num_hidden_layers=3), "num_hidden_layers is 3, but model.onnx has a cache for 2 layers"),
    (lambda d: d.update(num_key_value_heads=4), "the cache is num_key_value_heads 4 x head_size 6, but model.onnx's "
                                                "past_key_values.0.key is ['B', 2, 'P', 6]"),
    (lambda d: d["inputs"].update(past_key_names="past.%d.key"), "past_key_names 'past.%d.key' does not name layer"),
    (lambda d: d["outputs"].update(logits="scores"), "outputs.logits is 'scores', which model.onnx does not have"),
    (lambda d: d.update(filename="other.onnx"), "names other.onnx, which is not in"),
    (lambda d: d.update(filename="../out/model.onnx"), "must name a file inside"),
])
def test_a_config_that_does_not_match_the_decoder_is_one_clear_error(change, needle, tmp_path, capsys):
    (tmp_path / "m.yaml").write_text(tiny_model_yaml("gqa", GENAI_ATTENTION["gqa"]))
    folder = build_decoder(tmp_path / "m.yaml", tmp_path / "out")
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    change(config["model"]["decoder"])
    path.write_text(json.dumps(config))
    capsys.readouterr()
    for backend in ("genai", "onnx:portable"):   # moe-ir's runner checks the config it would read eos from, too
        assert main(["generate", str(folder), "--backend", backend, "--prompt-ids", "1 2"]) == 1
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_genai_logits_at_every_position_equal_the_reference_prefill(tmp_path, capsys):
    """Decode equals prefill through GenAI: the prompt's logits, then one appended token at a time (the
    same sequence, fed back), each call's logits against one reference prefill of the whole sequence."""
    text = tiny_model_yaml("gqa16", GENAI_ATTENTION["gqa16-ort"])
    (tmp_path / "m.yaml").write_text(text)
    folder = build_decoder(tmp_path / "m.yaml", tmp_path / "out", "--flavour", "ort")
    spec = load_model_spec_text(text)
    weights = init_weights(build_model_graph(spec), 0)
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(11))
    prefill = interpret(build_model_graph(spec), {"input_ids": ids}, weights, dtype=torch.float64)["logits"][0]
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids[:, :5].numpy().astype(np.int32))
    got = [torch.from_numpy(np.array(generator.get_output("logits")))[0]]       # [5, V]
    for t in range(5, 9):
        generator.append_tokens(ids[:, t:t + 1].numpy().astype(np.int32))
        got.append(torch.from_numpy(np.array(generator.get_output("logits")))[0])   # [1, V]
    torch.testing.assert_close(torch.cat(got).double(), prefill, rtol=1e-4, atol=1e-4)
