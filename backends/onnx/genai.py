"""ONNX Runtime GenAI's side of a decoder build: whether GenAI can take the decode graph, its
`genai_config.json`, and the check that a folder's config matches its ONNX file.

GenAI (onnxruntime-genai) runs a decoder-only model from a folder holding the ONNX file and genai_config.json:
`model.decoder` names the file, its inputs/outputs (name patterns with %d for the layer) and the cache's shape
(num_key_value_heads x head_size per layer, the same for keys and values); `search` the generation defaults.
moe-ir's decode graph already has GenAI's names and layout (model_builder), so the config states what the
graph has. The KV cache is functional here (present = past + new tokens, a new tensor each call), so the
config sets `past_present_share_buffer` false: GenAI then feeds a past of P tokens and a mask of P+S, and
takes the present of P+S back, as moe-ir's own runner does.

What GenAI cannot take (`genai_refusal`): a cache whose key and value slots differ in heads or size (MLA's
latent layout: c_kv [B,1,L,kv_lora_rank] and the rotary key [B,1,L,qk_rope_head_dim]; MLA expanded whenever
qk_nope + qk_rope != v_head_dim), slot names other than key/value, or a bfloat16 model (GenAI's CPU provider
has no bf16 kernels). The build then writes the decoder without a config and says why.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch

from moe_ir.errors import BackendError, BackendUnavailable
from moe_ir.ir import ElemType, Graph, OpCode
from moe_ir.model_builder import DECODE_INPUTS, cache_entries

GENAI_CONFIG = "genai_config.json"
DECODER_FILE = "model.onnx"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# GenAI's generic decoder-only model type: no family-specific input handling.
MODEL_TYPE = "decoder"
DEFAULT_CONTEXT_LENGTH = 4096


def genai_refusal(graph: Graph) -> str:
    """Why onnxruntime-genai cannot run this decode graph ('' when it can)."""
    entries = cache_entries(graph)
    keys, values = entries[0::2], entries[1::2]
    for k, v in zip(keys, values):
        if k.past != PAST_KEY % k.layer or v.past != PAST_VALUE % v.layer:
            return (f"GenAI's cache holds one key and one value per layer (past_key_values.%d.key/.value); layer "
                    f"{k.layer} caches {k.past.rsplit('.', 1)[-1]} [B, {k.heads}, L, {k.dim}] and "
                    f"{v.past.rsplit('.', 1)[-1]} [B, {v.heads}, L, {v.dim}] (MLA's latent cache); build with "
                    f"--mla-cache expanded for GenAI, or run this decoder with moe-ir's ONNX runner")
        if (k.heads, k.dim) != (v.heads, v.dim):
            return (f"GenAI's cache has one head size for keys and values; layer {k.layer} has keys "
                    f"[B, {k.heads}, L, {k.dim}] and values [B, {v.heads}, L, {v.dim}] (MLA: qk_nope_head_dim + "
                    f"qk_rope_head_dim != v_head_dim); run this decoder with moe-ir's ONNX runner")
    shapes = {(e.heads, e.dim) for e in entries}
    if len(shapes) > 1:
        return f"GenAI's cache has one shape for every layer; this model's layers differ ({sorted(shapes)})"
    if entries[0].dtype == ElemType.BFLOAT16:
        return "onnxruntime-genai's CPU provider has no bfloat16 kernels; build float32 or float16 for GenAI"
    return ""


def genai_config(graph: Graph, *, filename: str = DECODER_FILE, tokens: Mapping[str, int | None] | None = None,
                 context_length: int | None = None) -> dict[str, Any]:
    """The genai_config.json of a decode graph GenAI can take (genai_refusal is '').
    `tokens`: bos_token_id / eos_token_id / pad_token_id of the checkpoint; `context_length`: the longest
    sequence (default 4096). GenAI needs an end-of-sequence id in the vocabulary (with none it takes the pad
    id, and it masks a generated pad token out of the attention): without one (a spec, not a checkpoint) the
    pad id, else 0, stands in as both (`missing_eos_note` says so in the build's notes)."""
    entries = cache_entries(graph)
    attention = graph.find(OpCode.CACHED_ATTENTION) + graph.find(OpCode.CACHED_MLA_ATTENTION)
    # Mixture of attention heads (JetMoE): kv_heads query heads per chosen expert, k experts per token.
    heads = [n.attrs["kv_heads"] * n.input("expert_idx").type.shape[1]
             for n in graph.find(OpCode.CACHED_MOA_ATTENTION)] + [n.attrs["heads"] for n in attention]
    embed = graph.find(OpCode.EMBEDDING)[0]
    vocab, hidden = (int(d) for d in embed.inputs[1].type.shape)
    tokens = dict(tokens or {})
    context = int(context_length or DEFAULT_CONTEXT_LENGTH)
    eos, bos, pad = (tokens.get(k) for k in ("eos_token_id", "bos_token_id", "pad_token_id"))
    if eos is None:
        eos = pad if pad is not None else 0
    if pad is None:
        pad = eos
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": int(bos) if bos is not None else 0,
            "eos_token_id": int(eos),
            "pad_token_id": int(pad),
            "vocab_size": vocab,
            "context_length": context,
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": hidden,
                "num_attention_heads": int(heads[0]),
                "num_key_value_heads": entries[0].heads,
                "head_size": entries[0].dim,
                "num_hidden_layers": len(entries) // 2,
                "inputs": {"input_ids": DECODE_INPUTS[0], "attention_mask": DECODE_INPUTS[1],
                           "position_ids": DECODE_INPUTS[2], "past_key_names": PAST_KEY,
                           "past_value_names": PAST_VALUE},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY,
                            "present_value_names": PRESENT_VALUE},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context,
                   "min_length": 0, "past_present_share_buffer": False, "early_stopping": True,
                   "length_penalty": 1.0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def missing_eos_note(tokens: Mapping[str, int | None] | None) -> str:
    """The build note when no end-of-sequence id is known ('' when one is)."""
    tokens = dict(tokens or {})
    if tokens.get("eos_token_id") is not None:
        return ""
    stand_in = tokens.get("pad_token_id") or 0
    return (f"genai: no end-of-sequence token known (a spec, not a checkpoint folder); GenAI needs one, so token "
            f"{stand_in} stands in as eos and pad: a run stops where the model emits {stand_in}")


# ------------------------------------------------------------------------------------------------
# checking a folder


def _onnx_dims(info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in info.type.tensor_type.shape.dim]


def check_genai_folder(folder: str | Path) -> dict[str, Any]:
    """The folder's genai_config.json, checked against its ONNX decoder before GenAI loads them: the file
    it names exists in the folder, the layer count, the cache's kv heads and head size, and every input and
    output name it lists are the file's. A BackendError names the first mismatch (GenAI's own message for
    these comes from deep inside a run, if at all)."""
    folder = Path(folder)
    path = folder / GENAI_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8")[: 1 << 20])
        decoder = config["model"]["decoder"]
        filename = decoder["filename"]
    except FileNotFoundError:
        raise BackendError(f"{folder}: no {GENAI_CONFIG}; build the folder with `moe-ir build --backend onnx "
                           f"--decoder` (a model GenAI cannot take has none: run it with --backend onnx:portable)") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackendError(f"{path}: not a GenAI config ({type(err).__name__}: {str(err)[:100]}); it needs "
                           f"model.decoder.filename") from None
    if not isinstance(filename, str) or Path(filename).name != filename or filename in ("", ".", ".."):
        raise BackendError(f"{path}: model.decoder.filename {filename!r} must name a file inside {folder}")
    model_path = folder / filename
    if not model_path.is_file():
        raise BackendError(f"{path}: model.decoder.filename names {filename}, which is not in {folder}")
    from .external_data import load_model

    proto = load_model(model_path)  # the external-data checks: nothing outside the folder
    inputs = {i.name: i for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    names = decoder.get("inputs", {}) or {}
    out_names = decoder.get("outputs", {}) or {}
    layers = decoder.get("num_hidden_layers")
    past_key = names.get("past_key_names", PAST_KEY)
    file_layers = len({n.split(".")[1] for n in inputs if n.startswith("past_key_values.")})
    if layers != file_layers:
        raise BackendError(f"{path}: num_hidden_layers is {layers}, but {filename} has a cache for {file_layers} "
                           f"layers; the config belongs to another build (rebuild the folder)")
    for role, default in (("input_ids", DECODE_INPUTS[0]), ("attention_mask", DECODE_INPUTS[1]),
                          ("position_ids", DECODE_INPUTS[2])):
        name = names.get(role, default)
        if name not in inputs:
            raise BackendError(f"{path}: inputs.{role} is '{name}', which {filename} does not have (inputs: "
                               f"{', '.join(list(inputs)[:4])}, ...)")
    for role, pattern, table, default in (("past_key_names", past_key, inputs, PAST_KEY),
                                          ("past_value_names", names.get("past_value_names", PAST_VALUE), inputs,
                                           PAST_VALUE),
                                          ("present_key_names", out_names.get("present_key_names", PRESENT_KEY),
                                           outputs, PRESENT_KEY),
                                          ("present_value_names", out_names.get("present_value_names", PRESENT_VALUE),
                                           outputs, PRESENT_VALUE)):
        for layer in range(file_layers):
            if not isinstance(pattern, str) or "%d" not in pattern or pattern.replace("%d", str(layer)) not in table:
                raise BackendError(f"{path}: {role} '{pattern}' does not name layer {layer}'s cache in {filename}")
    if out_names.get("logits", "logits") not in outputs:
        raise BackendError(f"{path}: outputs.logits is '{out_names.get('logits')}', which {filename} does not have")
    heads, size = decoder.get("num_key_value_heads"), decoder.get("head_size")
    for layer in range(file_layers):
        for pattern in (past_key, names.get("past_value_names", PAST_VALUE)):
            dims = _onnx_dims(inputs[pattern.replace("%d", str(layer))])
            if len(dims) != 4 or dims[1] != heads or dims[3] != size:
                raise BackendError(f"{path}: the cache is num_key_value_heads {heads} x head_size {size}, but "
                                   f"{filename}'s {pattern.replace('%d', str(layer))} is {dims}; the config belongs "
                                   f"to another build (rebuild the folder)")
    return config


# ------------------------------------------------------------------------------------------------
# generating through GenAI


@dataclass
class GenAIRun:
    """What GenAI generated: tokens [B, N] and the seconds of each call (the first: the prompt's prefill and
    the first token)."""
    tokens: torch.Tensor
    times: list[float]


def genai_generate(folder: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0, on_token: Callable[[torch.Tensor], None] | None = None) -> GenAIRun:
    """Generate with onnxruntime-genai's Generator from a decoder folder (checked first: check_genai_folder).
    Greedy unless a sampling option is given. GenAI pads a batch on the right with the config's pad token
    (it reads trailing pad tokens as padding), so a prompt of a batch may not end with that token."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BackendUnavailable("onnxruntime-genai is not installed (pip install 'moe-ir[onnx]')") from None
    config = check_genai_folder(folder)
    pad = int(config["model"].get("pad_token_id", 0))
    width = max(len(p) for p in prompts)
    if len(prompts) > 1 and any(p[-1] == pad for p in prompts):
        raise BackendError(f"genai: a prompt of the batch ends with token {pad}, GenAI's pad token "
                           f"(genai_config.json model.pad_token_id), which it would read as padding")
    ids = np.full((len(prompts), width), pad, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    sampling = temperature is not None or top_k is not None or top_p is not None
    options: dict[str, Any] = {"max_length": width + max_new_tokens, "batch_size": len(prompts), "do_sample": sampling}
    if sampling:
        options.update(temperature=temperature or 1.0, top_k=top_k or 0, top_p=top_p or 1.0, random_seed=seed)
    try:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(**options)
        generator = og.Generator(model, params)
        times, steps = [], []
        start = time.perf_counter()
        generator.append_tokens(ids)
        while not generator.is_done() and len(steps) < max_new_tokens:
            generator.generate_next_token()
            token = torch.from_numpy(np.asarray(generator.get_next_tokens(), dtype=np.int64).copy())
            times.append(time.perf_counter() - start)
            steps.append(token)
            if on_token is not None:
                on_token(token)
            start = time.perf_counter()
    except RuntimeError as err:  # onnxruntime-genai raises RuntimeError with its own message
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(f"genai: {folder}: {first}") from None
    return GenAIRun(torch.stack(steps, dim=1), times)
