"""fp8 checkpoints as DeepSeek-V3 ships them (float8 e4m3 linear weights, float32 `weight_scale_inv` per
128 x 128 tile): a tiny DeepSeek-V3 saved by transformers, its linear weights quantized here to fp8 tiles,
imported kept quantized and dequantized; the numbers are checked against dequantization written here."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from moe_ir.errors import WeightsError  # noqa: E402
from moe_ir.interpreter import interpret  # noqa: E402
from moe_ir.model_builder import build_model_graph  # noqa: E402
from moe_ir.frontends.hf.fp8 import load_fp8_checkpoint  # noqa: E402
from moe_ir.quantization import with_quantization  # noqa: E402
from moe_ir.spec import QuantFormat  # noqa: E402

CONFIG = dict(vocab_size=61, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, rms_norm_eps=1e-5,
              tie_word_embeddings=False, intermediate_size=36, moe_intermediate_size=10, num_key_value_heads=3,
              n_shared_experts=1, n_routed_experts=6, routed_scaling_factor=2.5, kv_lora_rank=6, q_lora_rank=9,
              qk_rope_head_dim=4, v_head_dim=5, qk_nope_head_dim=6, n_group=3, topk_group=2, num_experts_per_tok=2,
              first_k_dense_replace=1, norm_topk_prob=True)


def is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3 stores in fp8: the attention and MLP projections (not embeddings, head, router, norms)."""
    return t.dim() == 2 and (".self_attn." in name or ".mlp." in name) and name.endswith("proj.weight") or \
        name.endswith("kv_a_proj_with_mqa.weight")


def to_fp8_tiles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written here, independently of moe-ir: scale = amax / 448 per 128 x 128 tile, value = w / scale."""
    n, k = w.shape
    rows, cols = math.ceil(n / 128), math.ceil(k / 128)
    scales = torch.empty(rows, cols)
    codes = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].double()
            s = float(tile.abs().max()) / 448.0 or 1.0
            scales[i, j] = s
            stored_scale = torch.tensor(s, dtype=torch.float32).double()
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (tile / stored_scale).to(torch.float8_e4m3fn)
    return codes, scales


def from_fp8_tiles(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=torch.float32)
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            out[i, j] = codes[i, j].float() * scales[i // 128, j // 128]
    return out


@pytest.fixture(scope="module")
def fp8_folder(tmp_path_factory):
    cfg = transformers.DeepseekV3Config(**CONFIG)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    folder = tmp_path_factory.mktemp("dsv3-fp8")
    model.save_pretrained(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if is_fp8_linear(name, t):
            codes, scales = to_fp8_tiles(t)
            out[name], out[name + "_scale_inv"] = codes, scales
            dequantized[name] = from_fp8_tiles(codes, scales)
        else:
            out[name] = t
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder, out, dequantized


def test_dequantized_import_equals_dequantization_by_hand(fp8_folder):
    folder, _, dequantized = fp8_folder
    spec, weights = load_fp8_checkpoint(folder, keep=False)
    assert spec.quantization is None
    for e in (0, 5):
        torch.testing.assert_close(weights["layers.1.moe.experts.w_up"][e],
                                   dequantized[f"model.layers.1.mlp.experts.{e}.up_proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(weights["layers.0.attn.w_q_b"], dequantized["model.layers.0.self_attn.q_b_proj.weight"],
                               rtol=0, atol=0)


def test_kept_quantized_import_keeps_every_bit(fp8_folder):
    folder, stored, dequantized = fp8_folder
    spec, weights = load_fp8_checkpoint(folder, keep=True)
    q = spec.quantization
    assert q.format == QuantFormat.FP8_E4M3 and q.block == 128
    assert q.weights.routed_experts and q.weights.shared_experts and q.weights.attention and q.weights.dense_ffn
    assert not q.weights.embeddings and not q.weights.head
    codes = weights["layers.1.moe.experts.w_down.qweight"]
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == (6, 24, 10)
    for e in range(6):
        assert torch.equal(codes[e].view(torch.uint8),
                           stored[f"model.layers.1.mlp.experts.{e}.down_proj.weight"].view(torch.uint8))
    assert torch.equal(weights["layers.1.moe.experts.w_down.scales"][2],
                       stored["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"])
    # the quantized model computes with exactly the dequantized values
    graph = build_model_graph(spec)
    float_spec, float_weights = load_fp8_checkpoint(folder, keep=False)
    float_graph = build_model_graph(float_spec)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    got = interpret(graph, {"input_ids": ids}, weights, dtype=torch.float64)["logits"]
    want = interpret(float_graph, {"input_ids": ids}, float_weights, dtype=torch.float64)["logits"]
    # the dequantized import holds each weight rounded once to float32; the kept one dequantizes in float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert with_quantization(spec, None) == float_spec


def _rewrite(folder, tmp_path, change):
    import shutil

    target = tmp_path / "bad"
    shutil.copytree(folder, target)
    tensors = load_file(str(target / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def test_bad_scales_name_the_tensor(fp8_folder, tmp_path):
    folder = fp8_folder[0]
    name = "model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"

    def nan(t):
        t[name] = torch.full_like(t[name], float("nan"))

    with pytest.raises(WeightsError, match=name.replace(".", r"\.") + " holds non-finite scales"):
        load_fp8_checkpoint(_rewrite(folder, tmp_path / "nan", nan), keep=False)

    def wrong_shape(t):
        t[name] = torch.ones(2, 1)

    with pytest.raises(WeightsError, match=name.replace(".", r"\.") + r" has shape \[2, 1\]"):
        load_fp8_checkpoint(_rewrite(folder, tmp_path / "shape", wrong_shape), keep=True)

    def missing(t):
        del t[name]

    with pytest.raises(WeightsError, match="has no " + name.replace(".", r"\.")):
        load_fp8_checkpoint(_rewrite(folder, tmp_path / "missing", missing), keep=True)


def test_hf_folder_loads_kept_and_import_hf_writes_dequantized(fp8_folder, tmp_path):
    from moe_ir.cli import main
    from moe_ir.frontends.hf.checkpoint import load_hf_checkpoint

    folder, _, dequantized = fp8_folder
    spec, weights = load_hf_checkpoint(folder)
    assert spec.quantization is not None and "layers.1.moe.experts.w_up.qweight" in weights
    out = tmp_path / "imported"
    out.mkdir()
    assert main(["import-hf", str(folder), "--model", "--weights", str(folder), "-o", str(out / "m.yaml"),
                 "--weights-out", str(out / "m.safetensors")]) == 0
    written = load_file(str(out / "m.safetensors"))
    assert torch.equal(written["layers.1.moe.experts.w_gate"][4],
                       dequantized["model.layers.1.mlp.experts.4.gate_proj.weight"])
