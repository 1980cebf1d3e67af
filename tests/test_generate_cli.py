"""`moe-ir generate`: the command against independent oracles.

Spec sources are checked against `greedy_generate` with the reference interpreter's step (float64) on the
same seeded weights; a Hugging Face checkpoint folder against transformers' own `generate` (greedy) on the
model that wrote it, which is the check that the whole path (checkpoint import, decode graph, cache, RoPE
positions) gives what transformers gives.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from moe_ir.cli import main
from moe_ir.frontends import load_model_spec_text
from moe_ir.generation import greedy_generate, reference_step
from moe_ir.model_builder import build_model_graph
from moe_ir.model_spec import miniature_model, model_spec_to_dict
from moe_ir.params import init_weights, load_weights

from conftest import tiny_model_yaml

GQA = "{kind: gqa, heads: 4, kv_heads: 2, head_dim: 6, rope_theta: 500.0}"
MLA = "{kind: mla, heads: 3, kv_lora_rank: 10, qk_nope_head_dim: 6, qk_rope_head_dim: 4, v_head_dim: 5}"


def write_spec(folder: Path, name: str = "gqa", attention: str = GQA) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(tiny_model_yaml(name=name, attention=attention))
    return path


def generate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    rc = main(["generate", *argv, "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def reference_tokens(spec_path: Path, weights, prompts: list[list[int]], n: int, layout: str = "expanded"):
    """Greedy tokens of each prompt alone through the reference interpreter (the oracle)."""
    spec = load_model_spec_text(spec_path.read_text())
    graph = build_model_graph(spec, form="decode", mla_cache=layout)
    weights = weights if weights is not None else init_weights(graph, 0)
    return [greedy_generate(reference_step(graph, weights), graph, torch.tensor([p]), max_new_tokens=n)
            .tokens[0].tolist() for p in prompts]


@pytest.mark.parametrize("attention, backend, layout", [(GQA, "torch", None), (GQA, "reference", None),
                                                         (MLA, "torch", "latent"), (MLA, "torch", "expanded"),
                                                         (GQA, "compile", None)])
def test_greedy_tokens_equal_the_reference_loop(attention, backend, layout, tmp_path, capsys):
    spec = write_spec(tmp_path, "mla" if attention == MLA else "gqa", attention)
    extra = ["--mla-cache", layout] if layout else []
    got = generate_json(capsys, str(spec), "--backend", backend, "--prompt-ids", "5 17 3 60 9", "--max-new-tokens",
                        "7", *extra)
    assert got["tokens"] == reference_tokens(spec, None, [[5, 17, 3, 60, 9]], 7, layout or "expanded")
    assert got["prefill_tokens_per_s"] > 0 and got["decode_tokens_per_s"] > 0
    assert "text" not in got


def test_streamed_output_and_rates(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["generate", str(spec), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in reference_tokens(spec, None, [[1, 2, 3]], 5)[0]]
    assert "prefill: 3 tokens" in err and "decode: 4 tokens" in err and "tokens/s" in err


def test_shrink_generates_from_the_miniature_of_a_shipped_model(tmp_path, capsys):
    shipped = Path(__file__).resolve().parents[1] / "specs" / "models" / "deepseek-v3.yaml"
    got = generate_json(capsys, str(shipped), "--shrink", "32", "--prompt-ids", "3 1 4 1 5", "--max-new-tokens", "6")
    mini = tmp_path / "mini.yaml"
    mini.write_text(yaml.safe_dump(model_spec_to_dict(miniature_model(load_model_spec_text(shipped.read_text()), 32))))
    assert got["tokens"] == reference_tokens(mini, None, [[3, 1, 4, 1, 5]], 6)
    # the shipped spec is bf16; --dtype float64 runs the same miniature at the reference's precision
    in_f64 = generate_json(capsys, str(shipped), "--shrink", "32", "--prompt-ids", "3 1 4 1 5", "--max-new-tokens",
                           "6", "--dtype", "float64")
    mini.write_text(mini.read_text().replace("dtype: bfloat16", "dtype: float64"))
    assert "float64" in mini.read_text()
    assert in_f64["tokens"] == reference_tokens(mini, None, [[3, 1, 4, 1, 5]], 6)
    assert main(["generate", str(shipped), "--shrink", "32", "--prompt-ids", "1", "--weights", "w.safetensors"]) == 2
    assert "cannot be combined with --weights" in capsys.readouterr().err


def test_generation_stops_once_every_sequence_has_its_eos(tmp_path, capsys):
    spec = write_spec(tmp_path)
    prompts = [[1, 2, 3], [9, 9]]
    expected = reference_tokens(spec, None, prompts, 8)
    # the first prompt's third token as EOS: it ends there; the other stops at its own first EOS (if any)
    eos = expected[0][2]
    cut = [row[: row.index(eos) + 1] if eos in row else row for row in expected]
    file = tmp_path / "prompts.txt"
    file.write_text("1 2 3\n9 9\n")
    got = generate_json(capsys, str(spec), "--prompt-file", str(file), "--max-new-tokens", "8",
                        "--eos-token-id", str(eos))
    assert got["tokens"] == cut
    steps = max(len(row) for row in cut)
    # one prompt streams: nothing after its EOS, and the loop ends there (steps - 1 decode calls)
    assert main(["generate", str(spec), "--prompt-ids", "1 2 3", "--max-new-tokens", "8",
                 "--eos-token-id", str(eos)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(t) for t in cut[0]]
    assert "decode: 2 tokens" in err, err
    assert steps <= 8


def test_a_left_padded_batch_equals_each_prompt_alone(tmp_path, capsys):
    spec = write_spec(tmp_path, "mla", MLA)
    prompts = [[4, 8, 15, 16, 23, 42], [7], [33, 2, 50]]
    file = tmp_path / "prompts.txt"
    file.write_text("\n".join(" ".join(map(str, p)) for p in prompts) + "\n\n")
    got = generate_json(capsys, str(spec), "--prompt-file", str(file), "--max-new-tokens", "5", "--mla-cache",
                        "latent")
    assert got["tokens"] == reference_tokens(spec, None, prompts, 5)
    # without --json a batch prints one line per prompt
    assert main(["generate", str(spec), "--prompt-file", str(file), "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [list(map(int, line.split())) for line in lines] == got["tokens"]


def test_sampling_is_reproducible_and_not_greedy(tmp_path, capsys):
    spec = write_spec(tmp_path)
    common = [str(spec), "--prompt-ids", "1 2 3", "--max-new-tokens", "12"]
    greedy = generate_json(capsys, *common)["tokens"]
    hot = generate_json(capsys, *common, "--temperature", "50", "--seed", "4")["tokens"]
    assert generate_json(capsys, *common, "--temperature", "50", "--seed", "4")["tokens"] == hot
    assert hot != greedy
    assert generate_json(capsys, *common, "--temperature", "50", "--seed", "5")["tokens"] != hot
    # top-k 1 leaves only the likeliest token: greedy whatever the temperature
    assert generate_json(capsys, *common, "--temperature", "50", "--top-k", "1")["tokens"] == greedy
    # a tiny top-p keeps only the likeliest token too
    assert generate_json(capsys, *common, "--top-p", "1e-9", "--seed", "9")["tokens"] == greedy


def test_a_built_torch_folder_generates(tmp_path, capsys):
    spec = write_spec(tmp_path)
    out = tmp_path / "built"
    assert main(["build", str(spec), "--backend", "torch", "-o", str(out), "--seed", "3"]) == 0
    got = generate_json(capsys, str(out), "--prompt-ids", "9 8 7", "--max-new-tokens", "6")
    graph = build_model_graph(load_model_spec_text(spec.read_text()), form="decode")
    weights = load_weights(out / "weights.safetensors", graph)
    assert got["tokens"] == reference_tokens(spec, weights, [[9, 8, 7]], 6)
    # the folder's weights are not the seed-0 ones: the folder, not the spec's default, was used; the spec
    # with the build's seed gives the same weights
    common = [str(spec), "--prompt-ids", "9 8 7", "--max-new-tokens", "6"]
    assert got["tokens"] != generate_json(capsys, *common)["tokens"]
    assert got["tokens"] == generate_json(capsys, *common, "--weights-seed", "3")["tokens"]


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoint folders: transformers' generate is the oracle

transformers = pytest.importorskip("transformers")

HF_COMMON = dict(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
HF_FAMILIES = {
    "olmoe": lambda t: t.OlmoeConfig(**HF_COMMON, intermediate_size=10, num_key_value_heads=3, num_experts=7,
                                     num_experts_per_tok=3, norm_topk_prob=True),
    "deepseek_v2": lambda t: t.DeepseekV2Config(
        **HF_COMMON, intermediate_size=36, moe_intermediate_size=10, num_key_value_heads=3, n_shared_experts=2,
        n_routed_experts=6, kv_lora_rank=6, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=5, qk_nope_head_dim=6,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method="greedy", routed_scaling_factor=1.5),
}


def hf_model(family: str, folder: Path):
    cfg = HF_FAMILIES[family](transformers)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # grouped_mm wants 16-byte strides, which odd tiny widths lack
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # norms away from 1, weights large enough that the greedy choice is clear-cut
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_checkpoint_folder_generates_what_transformers_generates(family, tmp_path, capsys):
    model = hf_model(family, tmp_path / family)
    prompt = [3, 14, 15, 9, 26, 53, 5]
    got = generate_json(capsys, str(tmp_path / family), "--prompt-ids", " ".join(map(str, prompt)),
                        "--max-new-tokens", "10")
    with torch.no_grad():
        ids = torch.tensor([prompt])
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert got["tokens"] == [want]


def test_a_checkpoint_refuses_more_positions_than_it_was_made_for(tmp_path, capsys):
    folder = tmp_path / "olmoe"
    hf_model("olmoe", folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 12
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["generate", str(folder), "--prompt-ids", "3 14 15 9 26 53 5"]
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", "6"]) == 2
    err = capsys.readouterr().err
    assert "a prompt of 7 tokens + --max-new-tokens 6 is longer than the 12 positions" in err, err
    assert len(generate_json(capsys, *argv[1:], "--max-new-tokens", "5")["tokens"][0]) <= 5


def test_prompt_text_through_the_folder_tokenizer(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "olmoe"
    hf_model("olmoe", folder)
    words = [f"w{i}" for i in range(60)] + ["[UNK]"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))
    got = generate_json(capsys, str(folder), "--prompt", "w3 w14 w15", "--max-new-tokens", "4")
    by_ids = generate_json(capsys, str(folder), "--prompt-ids", "3 14 15", "--max-new-tokens", "4")
    assert got["tokens"] == by_ids["tokens"]
    assert got["text"] == [" ".join(words[t] for t in got["tokens"][0])]
    assert main(["generate", str(folder), "--prompt", "w3 w14 w15", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == got["text"][0]


# ------------------------------------------------------------------------------------------------
# bad input: one line each, exit 2 for the command line's fault, 1 for files that do not belong together


@pytest.mark.parametrize("argv, needle", [
    (["--prompt-ids", "1 61 2"], "outside the vocabulary [0, 61)"),
    (["--prompt-ids", "-1"], "outside the vocabulary"),
    (["--prompt-ids", "  "], "empty prompt"),
    (["--prompt-ids", "1 x"], "not a token id"),
    (["--prompt-ids", "1", "--mla-cache", "latent"], "--mla-cache chooses an MLA model's cache layout"),
    (["--prompt", "hello"], "--prompt needs a tokenizer"),
    ([], "give exactly one of --prompt-ids, --prompt-file, --prompt"),
    (["--prompt-ids", "1", "--temperature", "0"], "--temperature must be a positive number"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--prompt-ids", "1", "--eos-token-id", "61"], "--eos-token-id 61 is outside the vocabulary [0, 61)"),
    (["--prompt-ids", "1", "--backend", "triton"], "backend 'triton' cannot run the decode graph"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    spec = write_spec(tmp_path)
    capsys.readouterr()
    assert main(["generate", str(spec), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_empty_prompt_file_and_max_new_tokens(tmp_path, capsys):
    spec = write_spec(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["generate", str(spec), "--prompt-file", str(empty)]) == 2
    assert "no prompt in it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: --max-new-tokens below 1
        main(["generate", str(spec), "--prompt-ids", "1", "--max-new-tokens", "0"])
    assert exit_info.value.code == 2
    assert "--max-new-tokens" in capsys.readouterr().err


def test_a_folder_whose_files_do_not_match_is_refused(tmp_path, capsys):
    spec_a, spec_b = write_spec(tmp_path, "a"), write_spec(tmp_path, "b", GQA.replace("500.0", "900.0"))
    out_a, out_b = tmp_path / "out-a", tmp_path / "out-b"
    assert main(["build", str(spec_a), "--backend", "torch", "-o", str(out_a)]) == 0
    assert main(["build", str(spec_b), "--backend", "torch", "-o", str(out_b)]) == 0
    shutil.copy(out_b / "weights.safetensors", out_a / "weights.safetensors")  # same shapes, other spec
    capsys.readouterr()
    assert main(["generate", str(out_a), "--prompt-ids", "1 2"]) == 1
    err = capsys.readouterr().err
    assert "written for another spec" in err and len(err.strip().splitlines()) == 1
    # the same weights given to the other spec file: refused the same way
    assert main(["generate", str(spec_a), "--weights", str(out_b / "weights.safetensors"), "--prompt-ids", "1"]) == 1
    assert "written for another spec" in capsys.readouterr().err
    assert main(["generate", str(tmp_path), "--prompt-ids", "1"]) == 2
    assert "neither a Hugging Face checkpoint folder" in capsys.readouterr().err
