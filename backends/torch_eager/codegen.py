"""Emit the standalone PyTorch source of a lowered graph (`model.py`), as torch.fx emits Python from its graph.

The file depends on torch alone. Its forward walks the graph's nodes in order, one line per node, calling
the function the torch op table (`torch_ops.lower_node`) gives that node, with the node's attributes as
literals; those functions, and the kernels they call, are copied verbatim from `torch_kernels` and
`torch_ops.py` (`torch_source`). Parameters carry the graph's weight names (`router.weight`,
`layers.3.moe.experts.w_up`), so `load_state_dict` reads the safetensors written beside the file. The eager
module runs the same functions in the same order, so the two agree bitwise, and a pass (fuse-gate-up,
fuse-shared-experts, ...) changes this file as it changes every other backend's output.

A layer graph gives `class MoELayer` (forward(x, generator=None) -> (out, routing, losses)); a model graph
gives `class DecoderModel` (forward(input_ids, generator=None) -> (logits, routing, losses)).
"""
from __future__ import annotations

import builtins
import keyword
import re
from typing import Any

import torch

from moe_ir.builder import ROUTER_BIAS
from moe_ir.ir import Graph, GraphKind, Value, ValueKind
from .. import torch_source
from ..torch_ops import lower_node
from moe_ir.model_builder import cache_entries, is_decode_graph
from .module import compute_dtype_weight, output_groups

# What a node's run-time arguments are in the generated forward (torch_ops.RUNTIME_ARGS).
RUNTIME_EXPRESSIONS = {"training": "self.training", "generator": "generator", "expert_kernel": "grouped_ffn",
                       "packed_expert_kernel": "grouped_ffn_packed", "int4_activations": "None"}
# Functions a run-time expression names, copied like the ones the table names.
RUNTIME_FUNCTIONS = {"expert_kernel": "grouped_ffn", "packed_expert_kernel": "grouped_ffn_packed"}
CLASS_NAMES = {GraphKind.LAYER: "MoELayer", GraphKind.MODEL: "DecoderModel"}


def docstring_text(text: str) -> str:
    """`text` escaped for a triple-quoted literal. Spec strings (`source` above all) are free text: a
    backslash in them would make model.py fail to compile (an invalid escape), and three double quotes
    would end the docstring early and turn the rest of the string into code."""
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def literal(value: Any) -> str:
    """A plain attribute value as Python source."""
    if isinstance(value, torch.dtype):
        return str(value)  # torch.float32
    if isinstance(value, (str, int, float, bool)) or value is None:
        return repr(value)
    if isinstance(value, tuple):  # a descriptor of plain values (the kernels' RoPE argument)
        return "(" + "".join(f"{literal(v)}, " for v in value) + ")"
    raise TypeError(f"no literal for attribute value {value!r} ({type(value).__name__})")


def weight_expression(name: str) -> str:
    """`layers.3.moe.experts.w_up` -> `self.layers[3].moe.experts.w_up` (numbered children by index)."""
    parts = ["self"]
    for part in name.split("."):
        if part.isdigit():
            parts.append(f"[{part}]")
        elif part.isidentifier() and not keyword.iskeyword(part):
            parts.append(f".{part}")
        else:
            raise ValueError(f"weight name {name!r}: part {part!r} is neither an index nor an identifier")
    return "".join(parts)


class _LocalNames:
    """Python names for graph values: the value name with dots as underscores, never shadowing a copied
    function, an import, a builtin or another value."""

    def __init__(self, reserved: set[str]):
        self.taken = set(reserved)
        self.names: dict[str, str] = {}

    def __call__(self, value_name: str) -> str:
        if value_name not in self.names:
            base = re.sub(r"\W", "_", value_name)
            if not base.isidentifier() or keyword.iskeyword(base):
                base = f"v_{base}"
            name = base
            while name in self.taken:
                name += "_"
            self.taken.add(name)
            self.names[value_name] = name
        return self.names[value_name]


def _forward_lines(graph: Graph, calls: list, local: _LocalNames) -> list[str]:
    def operand(value: Value | None) -> str:
        if value is None:
            return "None"
        if value.kind in (ValueKind.PARAM, ValueKind.BUFFER):
            return weight_expression(value.name)
        return local(value.name)

    out: list[str] = []
    section = None
    dead = dict(zip((n.name for n in graph.nodes), graph.last_reads()))
    for node, call in calls:
        layer = re.match(r"layers\.(\d+)\.", node.name)
        here = layer.group(1) if layer else None
        if graph.kind == GraphKind.MODEL and here != section:
            out.append(f"        # layer {here}" if here is not None else "        # head")
            section = here
        args = [f"unpacked({operand(v)})" if i in call.unpack else operand(v) for i, v in enumerate(node.inputs)]
        args += [literal(a) for a in call.attrs]
        args += [RUNTIME_EXPRESSIONS[name] for name in call.runtime]
        args += [f"{key}={literal(value)}" for key, value in call.keywords]
        targets = ", ".join(local(v.name) for v in node.outputs)
        out.append(f"        {targets} = {call.fn.__name__}({', '.join(args)})")
        if dead[node.name]:  # as the eager module's run: freed after their last read
            out.append(f"        del {', '.join(local(name) for name in dead[node.name])}")
    return out


def _init_lines(graph: Graph) -> list[str]:
    out: list[str] = []
    made: set[str] = set()
    for name, value in graph.weights.items():
        *path, leaf = name.split(".")
        for depth in range(1, len(path) + 1):
            prefix = ".".join(path[:depth])
            if prefix in made:
                continue
            made.add(prefix)
            owner = weight_expression(".".join(path[:depth - 1])) if depth > 1 else "self"
            part = path[depth - 1]
            out.append(f"        {owner}.add_module({part!r}, _Params())" if part.isdigit() else
                       f"        {owner}.{part} = _Params()")
        owner = weight_expression(".".join(path)) if path else "self"
        shape = ", ".join(str(d) for d in value.type.shape)
        dtype = str(value.type.dtype.torch)
        if value.kind == ValueKind.BUFFER:
            out.append(f"        {owner}.register_buffer({leaf!r}, torch.zeros({shape}, dtype={dtype}))")
        else:
            out.append(f"        {owner}.{leaf} = nn.Parameter(torch.empty({shape}, dtype={dtype}))")
    return out


def _update_bias_lines(graph: Graph) -> list[str]:
    """The aux-loss-free bias update (b_i += γ·sign(mean load − load_i)) of every biased MoE layer."""
    biased = [name for name in graph.weights if name == ROUTER_BIAS or name.endswith("." + ROUTER_BIAS)]
    if not biased:
        return []
    if graph.kind == GraphKind.LAYER:
        return ["", "    @torch.no_grad()", "    def update_bias(self, tokens_per_expert):",
                '        """Call after each optimiser step with routing["tokens_per_expert"]."""',
                f"        return update_bias({weight_expression(biased[0])}, tokens_per_expert, self.gamma)"]
    out = ["", "    @torch.no_grad()", "    def update_bias(self, routing):",
           '        """Call after each optimiser step with the routing record of the forward."""']
    for name in biased:
        key = name[: -len(ROUTER_BIAS)].removesuffix("moe.") + "tokens_per_expert"
        out.append(f"        update_bias({weight_expression(name)}, routing[{key!r}], self.gamma)")
    return out


def _decode_forward(graph: Graph, local: _LocalNames) -> tuple[list[str], list[str], str]:
    """For a decode graph: (the forward's first lines, the methods after it, the returned cache expression).
    The cache is a dict from past names to tensors; forward returns the present one under the same names,
    so it feeds the next call as is; position_ids are computed from the attention mask."""
    entries = cache_entries(graph)
    table = ", ".join(f"({e.past!r}, {e.present!r}, {e.heads}, {e.dim})" for e in entries)
    # the embedding table's dtype (a quantized table: its scales')
    dtype_of = weight_expression("embed.weight" if "embed.weight" in graph.weights else "embed.weight.scales")
    first = entries[0].past
    head = [
        "        if cache is None:",
        "            cache = self.empty_cache(input_ids.shape[0], input_ids.device)",
        f"        past = cache[{first!r}].shape[2]",
        "        if attention_mask is None:",
        "            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.int64,",
        "                                        device=input_ids.device)",
        "        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, past:]",
    ]
    for name in ("attention_mask", "position_ids"):
        local.taken.add(name)
        local.names[name] = name
    for e in entries:
        head.append(f"        {local(e.past)} = cache[{e.past!r}]")
    methods = [
        "",
        f"    CACHE = [{table}]  # (past name, present output, heads, dim): [B, heads, length, dim] each",
        "",
        "    def empty_cache(self, batch, device=None):",
        '        """The cache before the first call (no tokens)."""',
        f"        return {{past: torch.zeros(batch, heads, 0, dim, dtype={dtype_of}.dtype, device=device)",
        "                for past, _, heads, dim in self.CACHE}",
        "",
        "    @torch.no_grad()",
        "    def generate(self, input_ids, attention_mask=None, max_new_tokens=16, eos_token_id=None):",
        '        """Greedy continuation of the prompts input_ids [B, S0] (left-padded where attention_mask is 0):',
        '        the new tokens [B, max_new_tokens]; one call on the prompts, then one per token, the cache reused."""',
        "        if attention_mask is None:",
        "            attention_mask = torch.ones_like(input_ids)",
        "        cache, new, out = None, input_ids, []",
        "        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)",
        "        for _ in range(max_new_tokens):",
        "            logits, cache, _, _ = self(new, attention_mask, cache)",
        "            token = logits[:, -1].argmax(dim=-1)",
        "            if eos_token_id is not None:  # a finished sequence goes on producing eos",
        "                token = torch.where(done, torch.full_like(token, eos_token_id), token)",
        "                done = done | (token == eos_token_id)",
        "            out.append(token)",
        "            new = token[:, None]",
        "            attention_mask = torch.cat([attention_mask, torch.ones_like(new)], dim=1)",
        "        return torch.stack(out, dim=1)",
    ]
    present = ", ".join(f"{e.past!r}: {local(graph.outputs[e.present].name)}" for e in entries)
    return head, methods, "{" + present + "}"


def generate_source(graph: Graph, *, description: list[str] = (), gamma: float | None = None) -> str:
    """The text of model.py for a lowered layer or model graph. `description`: lines for the docstring (the
    spec it was built from); `gamma`: the aux-loss-free bias update rate, a training setting the graph
    does not carry."""
    calls = [(node, lower_node(node)) for node in graph.nodes]
    needed = {call.fn.__name__ for _, call in calls}
    needed |= {RUNTIME_FUNCTIONS[name] for _, call in calls for name in call.runtime if name in RUNTIME_FUNCTIONS}
    update_bias = _update_bias_lines(graph)
    if update_bias:
        needed.add("update_bias")
    functions = torch_source.closure(needed)
    model = graph.kind == GraphKind.MODEL
    class_name = CLASS_NAMES[graph.kind]
    input_name = graph.inputs[0].name
    reserved = set(torch_source.FUNCTIONS) | set(dir(builtins)) | {"self", "torch", "F", "nn", "math", "generator",
                                                                    "routing", "losses", "_Params", class_name,
                                                                    "cache", "past"}
    decode = is_decode_graph(graph)
    local = _LocalNames(reserved)
    local.taken.add(input_name)
    local.names[input_name] = input_name
    main, routing, losses = output_groups(graph)

    pipeline = graph.meta.get("pipeline") or "none"
    doc = [f"{'Model' if model else 'MoE layer'} '{graph.name}', generated by moe-ir from its lowered IR graph "
           f"(spec hash {graph.meta.get('spec_hash', '?')}, passes: {pipeline}).",
           "",
           "Standalone: depends on torch only. Parameter names match weights.safetensors, e.g.",
           "    from safetensors.torch import load_file",
           f"    {'model' if model else 'layer'} = {class_name}(); "
           f"{'model' if model else 'layer'}.load_state_dict(load_file('weights.safetensors'))",
           f"    {main}, routing, losses = {'model' if model else 'layer'}({input_name})  # "
           + ("input_ids int64 [batch, seq]" if model else "x [batch, seq, hidden]; out excludes the residual")
           if not decode else
           "    new_tokens = model.generate(input_ids, attention_mask, max_new_tokens=16)  # greedy; or step by step:\n"
           "    logits, cache, routing, losses = model(input_ids, attention_mask)  # then model(next_ids, mask, cache)",
           *(["", *description] if description else [])]
    out = ['"""' + docstring_text("\n".join(doc)), '"""', *torch_source.HEADER_IMPORTS, "from torch import nn", ""]
    out += torch_source.source_lines(functions)
    out += ["", "class _Params(nn.Module):",
            '    """A namespace in the parameter tree, so state_dict keys read as the graph\'s weight names; '
            '[i] is child \'i\'."""',
            "", "    def __getitem__(self, index):", "        return self._modules[str(index)]"]

    out += ["", "", f"class {class_name}(nn.Module):"]
    if update_bias:
        out.append(f"    gamma = {gamma!r}  # aux-loss-free bias update rate")
        out.append("")
    out += ["    def __init__(self):", "        super().__init__()", *_init_lines(graph)]
    if decode:
        out += ["", f"    def forward(self, {input_name}, attention_mask=None, cache=None, generator=None):",
                f'        """New tokens {input_name} [B, S] after the cached ones (attention_mask [B, P+S], 1 = real '
                "token; cache: the dict the previous call returned, None at first) -> "
                f"({main}, the cache after them, routing record, balance losses): one line per node of graph "
                f"'{docstring_text(graph.name)}'.\"\"\""]
        cache_head, cache_methods, present = _decode_forward(graph, local)
        out += cache_head
    else:
        out += ["", f"    def forward(self, {input_name}, generator=None):",
                f'        """{input_name} -> ({main}, routing record, balance losses): one line per node of graph '
                f"'{docstring_text(graph.name)}'.\"\"\""]
    if not model:
        out.append(f"        {input_name} = {input_name}.to({weight_expression(compute_dtype_weight(graph))}.dtype)")
    out += _forward_lines(graph, calls, local)
    values = local.names
    routing_text = ", ".join(f"{key!r}: {values[name]}" for key, name in routing)
    losses_text = ", ".join(f"{key!r}: {values[name]}" for key, name in losses)
    if decode:
        out.append(f"        return {values[graph.outputs[main].name]}, {present}, {{{routing_text}}}, {{{losses_text}}}")
        out += cache_methods
    else:
        out.append(f"        return {values[graph.outputs[main].name]}, {{{routing_text}}}, {{{losses_text}}}")
    out += update_bias
    return "\n".join(out) + "\n"


__all__ = ["generate_source"]
