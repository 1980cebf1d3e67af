"""Generation with a decode graph (moe_ir.model_builder, form decode): the cache between calls, the position
ids of left-padded prompts and the greedy loop, for any runner of such a graph.

A `Step` is anything that runs the decode graph: graph inputs by name (input_ids, attention_mask,
position_ids, past_key_values.*) -> graph outputs by name (logits, present.*). The reference interpreter
is one (`reference_step`); a backend's runner of a decode graph is another. The loop knows no backend.

The cache grows by concatenation: the graph is functional (present = past + new tokens, as ONNX Runtime
GenAI's past/present convention has it), so the cache object only swaps in each call's present tensors.
A preallocated cache written in place would save one copy of the cache per step, but would need an
in-place op in the graph and a maximum length fixed up front; at the lengths generation runs here the
copy costs little next to reading the expert weights, and every backend lowers the same functional op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .errors import BackendError
from .ir import Graph
from .model_builder import CacheEntry, cache_entries

__all__ = ["Generation", "KVCache", "Step", "decode_inputs", "greedy_generate", "position_ids_from_mask",
           "reference_step"]

Step = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class KVCache:
    """Every cache tensor of a decode graph between two calls, by graph input name
    (`past_key_values.{i}.key`, ...), each [B, heads, P, dim] with one P for all."""

    def __init__(self, entries: Sequence[CacheEntry], tensors: Mapping[str, torch.Tensor]):
        self.entries = list(entries)
        self.tensors = dict(tensors)

    @classmethod
    def empty(cls, graph_or_entries: Graph | Sequence[CacheEntry], batch: int, *, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None) -> "KVCache":
        """The cache before prefill: P = 0 (dtype: each entry's own unless given)."""
        entries = cache_entries(graph_or_entries) if isinstance(graph_or_entries, Graph) else list(graph_or_entries)
        return cls(entries, {e.past: torch.zeros(batch, e.heads, 0, e.dim, dtype=dtype or e.dtype.torch, device=device)
                             for e in entries})

    @property
    def length(self) -> int:
        """P: tokens cached per sequence (padding included)."""
        return int(self.tensors[self.entries[0].past].shape[2]) if self.entries else 0

    def update(self, outputs: Mapping[str, torch.Tensor], new_tokens: int) -> None:
        """Take each call's present tensors as the next call's past; they must hold the `new_tokens` more."""
        expected = self.length + new_tokens
        for e in self.entries:
            t = outputs.get(e.present)
            if t is None:
                raise BackendError(f"the decode step returned no '{e.present}' (outputs: {sorted(outputs)[:6]}...)")
            if t.dim() != 4 or t.shape[2] != expected:
                raise BackendError(f"'{e.present}' is {list(t.shape)}: expected {expected} cached tokens along "
                                   f"dim 2 (past {self.length} + new {new_tokens})")
            self.tensors[e.past] = t

    def select(self, rows: torch.Tensor) -> "KVCache":
        """The cache of some sequences of the batch (rows: indices)."""
        return KVCache(self.entries, {k: v.index_select(0, rows) for k, v in self.tensors.items()})


def position_ids_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """RoPE positions i64 [B, new_tokens] of the last `new_tokens` columns of attention_mask [B, L]: a real
    token's position counts the real tokens before it, so a left-padded prompt starts at 0 (padding: 0)."""
    positions = (attention_mask.to(torch.int64).cumsum(dim=1) - 1).clamp(min=0)
    return positions[:, attention_mask.shape[1] - new_tokens:]


def decode_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: KVCache) -> dict[str, torch.Tensor]:
    """The graph inputs of one call: the new tokens input_ids [B, S], the mask over past and new tokens
    [B, P+S], and the cache."""
    s = input_ids.shape[1]
    if attention_mask.shape != (input_ids.shape[0], cache.length + s):
        raise BackendError(f"attention_mask is {list(attention_mask.shape)}; it must cover the {cache.length} cached "
                           f"and {s} new tokens of each of {input_ids.shape[0]} sequences")
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask, s), **cache.tensors}


def reference_step(graph: Graph, weights: Mapping[str, torch.Tensor], *, dtype: torch.dtype = torch.float64) -> Step:
    """The reference interpreter as a Step of `graph` (the oracle of generation)."""
    from .interpreter import interpret

    return lambda inputs: interpret(graph, inputs, weights, dtype=dtype)


@dataclass
class Generation:
    """What a greedy run produced: the new tokens [B, N], the logits each step chose from [B, N, V] and
    the gap between the best and the second-best logit at each step [B, N] (small: a near-tie)."""
    tokens: torch.Tensor
    logits: torch.Tensor
    margins: torch.Tensor
    outputs: list[dict[str, torch.Tensor]] = field(default_factory=list)  # every call's outputs (keep_outputs)


def greedy_generate(step: Step, entries: Graph | Sequence[CacheEntry], input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
                    eos_token_id: int | None = None, cache_dtype: torch.dtype | None = None,
                    keep_outputs: bool = False, choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    on_token: Callable[[torch.Tensor], None] | None = None,
                    stop_at_eos: bool = False) -> Generation:
    """Greedy decoding: one prefill call on the prompts input_ids [B, S0] (left-padded where attention_mask
    has zeros), then one call per new token. A sequence that produced `eos_token_id` goes on producing it;
    with `stop_at_eos` the loop ends once every sequence has (fewer than max_new_tokens columns then).
    `choose(logits [B, V]) -> tokens [B]` replaces the argmax (a sampler); `on_token(tokens [B])` hears each
    step's tokens as they come (streaming)."""
    if input_ids.dim() != 2 or input_ids.dtype != torch.int64 or input_ids.shape[1] == 0:
        raise BackendError(f"prompts must be int64 [B, S] with S >= 1, got {input_ids.dtype} {list(input_ids.shape)}")
    if max_new_tokens < 1:
        raise BackendError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.int64)
    if mask.shape != input_ids.shape:
        raise BackendError(f"attention_mask {list(mask.shape)} must have the prompts' shape {list(input_ids.shape)}")
    batch = input_ids.shape[0]
    cache = KVCache.empty(entries, batch, dtype=cache_dtype, device=input_ids.device)
    new_ids = input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logits, margins, kept = [], [], [], []
    for _ in range(max_new_tokens):
        outputs = step(decode_inputs(new_ids, mask, cache))
        cache.update(outputs, new_ids.shape[1])
        last = outputs["logits"][:, -1].double()
        top2 = last.topk(2, dim=-1).values if last.shape[-1] > 1 else torch.cat([last, last], dim=-1)
        token = last.argmax(dim=-1) if choose is None else choose(outputs["logits"][:, -1]).to(torch.int64)
        token = token.to(input_ids.device)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, eos_token_id), token)
            done |= token == eos_token_id
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        logits.append(last)
        margins.append(top2[:, 0] - top2[:, 1])
        if keep_outputs:
            kept.append(dict(outputs))
        if stop_at_eos and bool(done.all()):
            break
        new_ids = token[:, None]
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=mask.device)], dim=1)
    return Generation(torch.stack(tokens, dim=1), torch.stack(logits, dim=1), torch.stack(margins, dim=1), kept)
