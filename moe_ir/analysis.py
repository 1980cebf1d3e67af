"""Static analysis of a layer: parameters (total and activated), FLOPs per token, expert combinations.

Counts come from the graph's declared weights (shapes only, nothing is allocated), so they count every
stored tensor: router, aux-loss-free bias buffer, noise projection, expert and shared weights and biases,
shared gate. "Activated" counts what one token reads: router (+ bias/noise), shared experts, shared gate
and top_k routed experts. FLOPs count 2 per multiply-add of the matmuls (router, experts), forward only;
elementwise work (activation, softmax, combine) is left out, as papers do.

With `spec.parallel` set, `parallel` adds the per-device numbers of expert parallelism: experts and
expert parameters per device (routed experts in contiguous blocks of routed/EP; shared experts whole on
every device, or 1/EP of their width each when tensor-parallel), and the all-to-all volume per token.
That volume assumes a token is sent once to each remote device holding any of its experts (deduplicated
dispatch, as backends/expert_parallel does), gets one row back from each, and counts only the hidden
vector (hidden x dtype bytes, both directions; routing metadata is left out). `a2a_bytes_per_token_max`
is the bound min(top_k, M or EP, EP - 1) remote devices; `a2a_bytes_per_token_expected` assumes UNIFORM
routing (each token's top-k a uniformly random set of experts, within M uniformly chosen devices when
device-limited), where a token reaches D'·(1 - C((D'-1)L, k)/C(D'L, k)) distinct devices out of the
D' = M or EP it may use (L experts each), a fraction (EP-1)/EP of them remote.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict

from .builder import build_graph
from .spec import Choice, LayerSpec, SharedPlacement


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
    parallel: dict | None = None  # per-device numbers when the spec sets parallel (see the module docstring)

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["parallel"] is None:
            del out["parallel"]  # specs without placement keep their JSON as it was
        return out


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
    flops = 2 * h * e.choices  # router projection (identity experts are scored too)
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
                         flops_per_token=flops, combinations=math.comb(e.choices, e.top_k), explicit=explicit,
                         paper=e.paper_view(), parallel=_parallel(spec, total, routed, shared, per_expert))


def _parallel(spec: LayerSpec, total: int, routed: int, shared: int, per_expert: int) -> dict | None:
    p = spec.parallel
    if p is None:
        return None
    e = spec.experts
    ep = p.expert_parallel
    local = e.routed // ep
    shared_tp = p.shared == SharedPlacement.TENSOR_PARALLEL
    # Tensor-parallel shared experts split everything but the down-projection bias, which stays whole.
    b_down = e.shared * spec.hidden if e.bias else 0
    shared_per_device = (shared - b_down) // ep + b_down if shared_tp else shared
    replicated = total - routed - shared
    reachable = p.device_limit if p.device_limit is not None else ep
    row_bytes = spec.hidden * spec.dtype.torch.itemsize
    remote_max = min(e.top_k, reachable, ep - 1)
    # Expected distinct devices among the `reachable` ones for a uniformly random k-subset of their experts.
    pool = reachable * local
    distinct = reachable * (1 - math.comb(pool - local, e.top_k) / math.comb(pool, e.top_k))
    remote_expected = distinct * (ep - 1) / ep
    return {"expert_parallel": ep, "device_limit": p.device_limit, "shared": p.shared.value,
            "experts_per_device": local, "expert_params_per_device": local * per_expert,
            "shared_params_per_device": shared_per_device,
            "params_per_device": replicated + shared_per_device + local * per_expert,
            "a2a_bytes_per_token_max": 2 * remote_max * row_bytes,
            "a2a_bytes_per_token_expected": round(2 * remote_expected * row_bytes, 1),
            "a2a_assumption": "deduplicated dispatch, hidden vector only, both directions; expected: uniform routing"}


def human_count(n: int) -> str:
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
        ("total params", f"{a.total_params:,} ({human_count(a.total_params)})"),
        ("activated params", f"{a.activated_params:,} ({human_count(a.activated_params)}) per token"),
        ("  router", f"{a.router_params:,}"),
        ("  routed experts", f"{a.routed_expert_params:,} ({a.params_per_routed_expert:,} each)"),
        ("  shared experts", f"{a.shared_params:,}"),
        ("FLOPs per token", f"{a.flops_per_token:,} ({human_count(a.flops_per_token)}, forward, 2 per MAC)"),
        ("expert combinations", f"C({x['routed']},{x['top_k']}) = {a.combinations:,}"),
    ]
    if a.parallel is not None:
        q = a.parallel
        limit = f", device limit M={q['device_limit']}" if q["device_limit"] is not None else ""
        rows += [
            ("expert parallel", f"EP={q['expert_parallel']}{limit}, shared experts {q['shared']}"),
            ("  per device", f"{q['experts_per_device']} routed experts, {q['expert_params_per_device']:,} expert "
                             f"params; {q['params_per_device']:,} params in all"),
            ("  all-to-all/token", f"{q['a2a_bytes_per_token_expected']:,.0f} B expected (uniform routing), "
                                   f"{q['a2a_bytes_per_token_max']:,} B at most (dispatch + combine)"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"
