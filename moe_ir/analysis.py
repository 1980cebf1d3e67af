"""Static analysis of a layer: parameters (total and activated), FLOPs per token, expert combinations.

Counts come from the graph's declared weights (shapes only, nothing is allocated), so they count every
stored tensor: router, aux-loss-free bias buffer, noise projection, expert and shared weights and biases,
shared gate. "Activated" counts what one token reads: router (+ bias/noise), shared experts, shared gate
and top_k routed experts. FLOPs count 2 per multiply-add of the matmuls (router, experts), forward only;
elementwise work (activation, softmax, combine) is left out, as papers do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

from .builder import build_graph
from .spec import Choice, LayerSpec


def _numel(shape) -> int:
    return math.prod(int(d) for d in shape)


@dataclass(frozen=True)
class LayerAnalysis:
    name: str
    total_params: int
    activated_params: int
    router_params: int
    routed_expert_params: int  # all routed experts
    params_per_routed_expert: int
    shared_params: int
    flops_per_token: int
    combinations: int  # C(routed, top_k): distinct expert sets a token can use
    explicit: dict
    paper: dict

    def to_dict(self) -> dict:
        return asdict(self)


def analyse(spec: LayerSpec) -> LayerAnalysis:
    g = build_graph(spec)
    e = spec.experts
    sizes = {name: _numel(v.type.shape) for name, v in g.weights.items()}
    routed = sum(n for k, n in sizes.items() if k.startswith("experts."))
    shared = sum(n for k, n in sizes.items() if k.startswith("shared"))
    router = sum(n for k, n in sizes.items() if k.startswith("router."))
    per_expert = routed // e.routed
    total = sum(sizes.values())
    activated = router + shared + e.top_k * per_expert
    h = spec.hidden
    ffn_matmuls = 3 if e.activation.gated else 2
    flops = 2 * h * e.routed  # router projection
    flops += e.top_k * 2 * ffn_matmuls * h * e.width
    flops += e.shared * 2 * ffn_matmuls * h * e.shared_ffn_width
    if e.shared_gate:
        flops += 2 * h
    if spec.router.noise is not None:
        flops += 2 * h * e.routed  # the noise projection runs in training only; counted as stored work
    explicit = {"routed": e.routed, "shared": e.shared, "width": e.width, "top_k": e.top_k,
                "shared_width": e.shared_ffn_width, "choice": spec.router.choice.value}
    if spec.router.choice == Choice.EXPERT:
        explicit["note"] = "expert-choice: top_k is the average experts per token at capacity factor 1"
    return LayerAnalysis(name=spec.name, total_params=total, activated_params=activated, router_params=router,
                         routed_expert_params=routed, params_per_routed_expert=per_expert, shared_params=shared,
                         flops_per_token=flops, combinations=math.comb(e.routed, e.top_k), explicit=explicit,
                         paper=e.paper_view())


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_analysis(a: LayerAnalysis) -> str:
    p, x = a.paper, a.explicit
    rows = [
        ("layer", a.name),
        ("paper form", f"N={p['N']} conventional experts of width F={p['F']}, m={p['m']}, K={p['K']}, Ks={p['Ks']}"),
        ("explicit form", f"{x['routed']} routed + {x['shared']} shared experts of width {x['width']}"
                          + (f" (shared width {x['shared_width']})" if x['shared_width'] != x['width'] else "")
                          + f", top-{x['top_k']} routed active ({x['choice']}-choice)"),
        ("total params", f"{a.total_params:,} ({_human(a.total_params)})"),
        ("activated params", f"{a.activated_params:,} ({_human(a.activated_params)}) per token"),
        ("  router", f"{a.router_params:,}"),
        ("  routed experts", f"{a.routed_expert_params:,} ({a.params_per_routed_expert:,} each)"),
        ("  shared experts", f"{a.shared_params:,}"),
        ("FLOPs per token", f"{a.flops_per_token:,} ({_human(a.flops_per_token)}, forward, 2 per MAC)"),
        ("expert combinations", f"C({x['routed']},{x['top_k']}) = {a.combinations:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"
