"""Whole-model Hugging Face checkpoints: `import-hf --model --weights` (single file, sharded, streamed) and
`export-hf` back to a folder transformers loads.

The oracle is transformers itself: a tiny random model of each family is saved with `save_pretrained`,
imported, checked against the reference interpreter, exported, and loaded again with
`AutoModelForCausalLM.from_pretrained`; its logits must equal the original model's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moe_ir.cli import main
from moe_ir.errors import SpecError, WeightsError
from moe_ir.interpreter import interpret
from moe_ir.model_builder import build_model_graph
from moe_ir.params import load_weights

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from moe_ir.frontends.hf.checkpoint import load_hf_checkpoint  # noqa: E402
from moe_ir.frontends.hf.export import export_hf_checkpoint  # noqa: E402
from moe_ir.frontends.yaml_spec import load_model_spec  # noqa: E402

# Odd sizes everywhere (vocabulary, hidden, heads, expert counts) so a transposed or misplaced tensor shows.
COMMON = dict(vocab_size=61, hidden_size=24, num_hidden_layers=3, num_attention_heads=3, rms_norm_eps=1e-5,
              tie_word_embeddings=False)
FAMILIES = {
    "deepseek_v2": lambda t: t.DeepseekV2Config(
        **COMMON, intermediate_size=36, moe_intermediate_size=10, num_key_value_heads=3, n_shared_experts=2,
        n_routed_experts=6, kv_lora_rank=6, q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=5, qk_nope_head_dim=6,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=3,
        topk_group=2, routed_scaling_factor=1.5),
    "deepseek_v3": lambda t: t.DeepseekV3Config(
        **COMMON, intermediate_size=36, moe_intermediate_size=10, num_key_value_heads=3, n_shared_experts=1,
        n_routed_experts=6, routed_scaling_factor=2.5, kv_lora_rank=6, q_lora_rank=9, qk_rope_head_dim=4,
        v_head_dim=5, qk_nope_head_dim=6, n_group=3, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        norm_topk_prob=True),
    "mixtral": lambda t: t.MixtralConfig(**COMMON, intermediate_size=14, num_key_value_heads=1, num_local_experts=5,
                                         num_experts_per_tok=2, rope_theta=1e6),
    "qwen2_moe": lambda t: t.Qwen2MoeConfig(
        **COMMON, intermediate_size=30, moe_intermediate_size=10, shared_expert_intermediate_size=18,
        num_key_value_heads=3, num_experts=5, num_experts_per_tok=2, mlp_only_layers=[1]),
    "olmoe": lambda t: t.OlmoeConfig(**COMMON, intermediate_size=10, num_key_value_heads=3, num_experts=7,
                                     num_experts_per_tok=3, norm_topk_prob=True),
}


def random_model(family: str, seed: int = 0):
    cfg = FAMILIES[family](transformers)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # every tensor random with norms near 1, so a misplaced weight changes the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn_like(b))
    return model


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits, ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (model, single-file folder, sharded folder), each saved by transformers."""
    out = {}
    for family in FAMILIES:
        model = random_model(family)
        single = tmp_path_factory.mktemp(f"{family}-single")
        sharded = tmp_path_factory.mktemp(f"{family}-sharded")
        model.save_pretrained(single)
        model.save_pretrained(sharded, max_shard_size="20KB")
        out[family] = (model, single, sharded)
    return out


def import_cli(folder: Path, out: Path, weights=None) -> tuple[Path, Path]:
    spec, weights_out = out / "model.yaml", out / "model.safetensors"
    rc = main(["import-hf", str(folder), "--model", "--weights", str(weights or folder), "-o", str(spec),
               "--weights-out", str(weights_out)])
    assert rc == 0
    return spec, weights_out


# ------------------------------------------------------------------------------------------------
# import: sharded equals single file, and both equal transformers through the reference interpreter


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_through_moe_ir_gives_transformers_logits(family, saved, tmp_path):
    model, single, sharded = saved[family]
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    spec_file, weights_file = import_cli(sharded, tmp_path)
    spec = load_model_spec(spec_file)
    weights = load_weights(weights_file, build_model_graph(spec))
    expected, ids = logits(model, spec.model.vocab_size)
    got = interpret(build_model_graph(spec), {"input_ids": ids}, weights)["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)

    out = tmp_path / "export"
    assert main(["export-hf", str(spec_file), "--weights", str(weights_file), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    again, _ = logits(back.float().eval(), spec.model.vocab_size)
    # Same weights, same transformers code: the logits are equal, not merely close.
    assert torch.equal(again, expected), (again - expected).abs().max()


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_sharded_import_equals_single_file_import(family, saved, tmp_path):
    _, single, sharded = saved[family]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    _, from_single = import_cli(single, tmp_path / "a", single / "model.safetensors")
    _, from_sharded = import_cli(single, tmp_path / "b", sharded / "model.safetensors.index.json")
    # explicit shard files too, as a list
    shards = sorted(sharded.glob("*.safetensors"))
    assert main(["import-hf", str(single), "--model", "--weights", *map(str, shards), "-o",
                 str(tmp_path / "c" / "m.yaml"), "--weights-out", str(tmp_path / "c" / "w.safetensors")]) == 0
    a, b, c = load_file(from_single), load_file(from_sharded), load_file(tmp_path / "c" / "w.safetensors")
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]) and torch.equal(a[name], c[name]), name
    spec, weights = load_hf_checkpoint(sharded)
    assert list(weights) == list(build_model_graph(spec).weights)
    for name in a:
        assert torch.equal(weights[name], a[name]), name
    with safe_open(str(from_sharded), "pt") as fh:
        assert fh.metadata()["spec_hash"]


def test_import_casts_to_the_config_dtype(saved, tmp_path):
    """A bfloat16 config gives a bfloat16 spec; float32 tensors are cast, the router bias stays float32."""
    model, single, _ = saved["deepseek_v3"]
    folder = tmp_path / "bf16"
    folder.mkdir()
    config = json.loads((single / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    (folder / "model.safetensors").symlink_to(single / "model.safetensors")
    spec, weights = load_hf_checkpoint(folder)
    assert spec.model.dtype.value == "bfloat16"
    assert weights["embed.weight"].dtype == torch.bfloat16
    assert weights["layers.1.moe.router.bias"].dtype == torch.float32
    assert torch.equal(weights["embed.weight"], model.model.embed_tokens.weight.detach().to(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# bad input: one clear WeightsError each, naming the file and tensor; nothing written


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_shard(folder: Path, tensor: str, change) -> str:
    """Apply change(dict of the shard holding `tensor`) and write the shard back; returns the shard's name."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][tensor]
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    return shard


def _expect_refusal(folder: Path, out: Path, capsys, *needles: str) -> str:
    out.mkdir(exist_ok=True)
    (out / "model.yaml").write_text("old spec\n")
    rc = main(["import-hf", str(folder), "--model", "--weights", str(folder), "-o", str(out / "model.yaml"),
               "--weights-out", str(out / "model.safetensors")])
    err = capsys.readouterr().err
    assert rc == WeightsError.exit_code, err
    assert err.count("\n") == 1, err  # one line
    for needle in needles:
        assert needle in err, (needle, err)
    # nothing half: the old spec is untouched, no weights and no staged files
    assert sorted(p.name for p in out.iterdir()) == ["model.yaml"]
    assert (out / "model.yaml").read_text() == "old spec\n"
    return err


def test_missing_shard(saved, tmp_path, capsys):
    folder = _copy_checkpoint(saved["mixtral"][2], tmp_path / "ckpt")
    gone = sorted(folder.glob("model-*.safetensors"))[1]
    gone.unlink()
    _expect_refusal(folder, tmp_path / "out", capsys, "model.safetensors.index.json", gone.name, "missing")


@pytest.mark.parametrize("weight_map, needle", [
    ([["model.norm.weight", "model-00001.safetensors"]], "'weight_map' must be a non-empty JSON object"),
    ({}, "'weight_map' must be a non-empty JSON object"),
    ({"model.norm.weight": "../elsewhere.safetensors"}, "is not a shard file name beside the index"),
    ({"model.norm.weight": 3}, "is not a shard file name beside the index"),
])
def test_malformed_index(saved, tmp_path, capsys, weight_map, needle):
    folder = _copy_checkpoint(saved["olmoe"][2], tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _expect_refusal(folder, tmp_path / "out", capsys, "model.safetensors.index.json", needle)


def test_index_names_a_tensor_its_shard_lacks(saved, tmp_path, capsys):
    folder = _copy_checkpoint(saved["olmoe"][2], tmp_path / "ckpt")
    shard = _rewrite_shard(folder, "model.norm.weight", lambda t: t.pop("model.norm.weight"))
    _expect_refusal(folder, tmp_path / "out", capsys, shard, "model.norm.weight", "does not hold")


def test_wrong_shape(saved, tmp_path, capsys):
    folder = _copy_checkpoint(saved["qwen2_moe"][2], tmp_path / "ckpt")
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    shard = _rewrite_shard(folder, name, lambda t: t.__setitem__(name, torch.zeros(11, 24)))
    _expect_refusal(folder, tmp_path / "out", capsys,
                    f"wrong shape: {name} ({shard}): expected [10, 24], found [11, 24]")


def test_wrong_dtype(saved, tmp_path, capsys):
    folder = _copy_checkpoint(saved["deepseek_v3"][2], tmp_path / "ckpt")
    name = "model.layers.1.mlp.experts.0.down_proj.weight"
    shard = _rewrite_shard(folder, name, lambda t: t.__setitem__(name, t[name].to(torch.int8)))
    _expect_refusal(folder, tmp_path / "out", capsys, f"{name} ({shard}): I8", "dequantize")


def test_missing_and_unexpected_tensors(saved, tmp_path, capsys):
    folder = _copy_checkpoint(saved["mixtral"][1], tmp_path / "ckpt")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _expect_refusal(folder, tmp_path / "out", capsys, "missing: model.layers.0.self_attn.k_proj.weight",
                    "unexpected: model.layers.0.self_attn.rotary.inv_freq")


def test_failure_while_streaming_leaves_nothing(saved, tmp_path, capsys, monkeypatch):
    """A read that fails after the checks passed (a disk error, say) leaves no half-written pair."""
    from moe_ir.frontends.hf import safetensors_io

    calls = {"n": 0}
    original = safetensors_io.Checkpoint.read_many

    def failing_read(self, names):
        calls["n"] += 1
        if calls["n"] == 20:
            raise WeightsError(f"simulated read error at {names[0]}")
        return original(self, names)

    monkeypatch.setattr(safetensors_io.Checkpoint, "read_many", failing_read)
    _expect_refusal(saved["deepseek_v2"][2], tmp_path / "out", capsys, "simulated read error")


def test_model_weights_need_both_outputs(saved, tmp_path, capsys):
    folder = saved["olmoe"][1]
    assert main(["import-hf", str(folder), "--model", "--weights", str(folder), "-o", str(tmp_path / "m.yaml")]) == 1
    assert "give -o SPEC.yaml and --weights-out" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------
# export refusals


def test_export_refuses_a_spec_no_family_expresses(tmp_path):
    """DeepSeekMoE (Llama attention, ungated shared experts) is remote code: no transformers family has it."""
    spec = load_model_spec(Path(__file__).resolve().parent.parent / "specs" / "models" / "deepseekmoe-2b.yaml")
    with pytest.raises(SpecError) as err:
        export_hf_checkpoint(spec, {}, tmp_path / "out")
    text = str(err.value)
    for family in ("deepseek_v3", "deepseek_v2", "qwen2_moe", "olmoe", "mixtral"):
        assert f"{family}: " in text
    assert "is MLA" in text and "exactly one shared expert" in text
    assert not (tmp_path / "out").exists()


def test_export_refuses_mismatched_weights_and_full_folders(saved, tmp_path):
    model, single, _ = saved["olmoe"]
    spec, weights = load_hf_checkpoint(single)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(WeightsError, match="not an empty folder"):
        export_hf_checkpoint(spec, weights, tmp_path / "full")
    bad = dict(weights)
    bad["norm.weight"] = torch.ones(5)
    with pytest.raises(WeightsError, match=r"norm.weight: expected \[24\], found \[5\]"):
        export_hf_checkpoint(spec, bad, tmp_path / "out")
    with pytest.raises(SpecError, match="mixtral: .*qk_norm"):
        export_hf_checkpoint(spec, weights, tmp_path / "out", family="mixtral")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# ------------------------------------------------------------------------------------------------
# memory: the import streams (peak resident memory well under the checkpoint's size)


def test_import_streams_without_a_second_copy(tmp_path):
    """~100 MB checkpoint (per-expert tensors that the import stacks): the conversion's peak resident memory
    above the process's baseline stays under half the checkpoint's size (a load-all-then-convert import
    needs at least the whole checkpoint, plus the stacked copy)."""
    cfg = transformers.MixtralConfig(vocab_size=4001, hidden_size=256, intermediate_size=512, num_hidden_layers=7,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2)
    folder = tmp_path / "ckpt"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, max_shard_size="30MB")
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    assert size > 90 * 2**20
    script = textwrap.dedent(f"""
        import sys
        from moe_ir.frontends.hf.cli import run_import_hf  # torch, safetensors and the builder loaded first
        from moe_ir.frontends.hf.checkpoint import import_hf_model
        from moe_ir.frontends.hf.config import read_config_json
        from moe_ir.frontends.hf.model import model_spec_from_hf_config
        from moe_ir.model_builder import build_model_graph
        def rss(key):
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
        spec = model_spec_from_hf_config(read_config_json({str(folder)!r})[0])
        build_model_graph(spec)
        base = rss("VmRSS:")
        import_hf_model({str(folder)!r}, {str(folder)!r}, {str(tmp_path / 'm.yaml')!r},
                        {str(tmp_path / 'm.safetensors')!r}, spec_text="x", spec=spec)
        print(rss("VmHWM:") - base)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    peak_growth = int(result.stdout.split()[-1])
    assert (tmp_path / "m.safetensors").stat().st_size > 0.99 * size
    assert peak_growth < 0.5 * size, (peak_growth / 2**20, size / 2**20)
