"""An expert-parallel MoE layer on torch.distributed: each rank holds a block of routed experts.

Every rank runs the layer on its own tokens x [B, S, H] (the ranks of the EP group are data-parallel
outside the layer). Forward, per rank:

1. route locally with replicated router weights: the reference semantics exactly (projection in the
   router dtype, softmax/sigmoid, aux-free bias for selection only, group limit or DeepSeek-V2 device
   limit through `moe_ir.ir.ops.route_topk`, normalise, scale);
2. dispatch: a token goes ONCE to each rank that holds at least one of its chosen experts (deduplicated
   per rank, so device-limited routing really bounds the traffic). The row sent is the token's hidden
   vector followed by its gate weights and a chosen-mask for that rank's L experts ([H + 2L] values in
   the activation dtype, which is where the reference applies the weights too). Split sizes go first in
   an all-to-all of counts, then the rows in one `all_to_all_single` with variable splits;
3. the receiving rank runs each local expert over the rows that chose it and sums the weighted results
   per row (one row back per row received);
4. combine: the reverse all-to-all brings one [H] row per (token, rank) back, summed into the token.

Dropless (every assignment is computed). Backward runs through the same all-to-alls in reverse
(`comm.all_to_all_rows`). Shared experts run locally on replicated weights, or tensor-parallel: every
rank's tokens are gathered (all-to-all), each rank applies its 1/EP slice of each shared expert's
width to all of them, and the partial outputs go back to their tokens' rank and are summed there (an
all-to-all reduce-scatter: the ranks hold different tokens, so a plain all_reduce would not do).

forward returns `EPOutput(out, routing, losses, comm)`; losses are computed from this rank's tokens and
the actual placement and returned, never stored. Gradients of replicated parameters cover this rank's
tokens; `sync_replicated_grads()` sums them over the group (what the global batch's gradient is).
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_ir.builder import ROUTER_BIAS, ROUTER_NOISE_WEIGHT, SHARED_GATE_WEIGHT, build_graph
from moe_ir.errors import BackendError, WeightsError
from moe_ir.ir import LossKind, ValueKind, WeightLayout
from moe_ir.ir.ops import balance_loss_math, ffn_math, route_topk, scale_weights
from moe_ir.params import init_weights
from moe_ir.spec import Choice, LayerSpec, ScoreFn
from .comm import all_to_all_rows, exchange_counts, gather_counts
from .losses import communication_balance_loss, device_balance_loss, z_loss
from .placement import Placement, shard_weights, unshard_weights

__all__ = ["CommStats", "EPOutput", "ExpertParallelMoE"]


class CommStats(NamedTuple):
    """What this rank's forward moved. Rows are token rows of the dispatch (one per (token, rank) pair);
    bytes count both all-to-alls of the routed path (dispatch payload out, results back) to or from
    OTHER ranks only (rows a rank keeps never leave it); the split-size exchange is left out."""

    send_rows: list[int]      # [D] rows this rank dispatched to each rank (own rank included)
    recv_rows: list[int]      # [D] rows this rank received from each rank (= tokens its experts served)
    bytes_sent: int
    bytes_received: int


class EPOutput(NamedTuple):
    out: torch.Tensor                   # [B, S, H] for this rank's tokens
    routing: dict[str, torch.Tensor]    # expert_idx, weights [T,k]; router_logits [T,E]; tokens_per_expert [E]
    losses: dict[str, torch.Tensor]     # by kind: switch, expert, device, sequence, z_loss, communication
    comm: CommStats

    @property
    def aux_loss(self) -> torch.Tensor:
        total = self.out.new_zeros(())
        for loss in self.losses.values():
            total = total + loss
        return total


class _Params(nn.Module):
    """A namespace in the parameter tree (`router`, `experts`, `shared.0`, ...)."""


_FFN_LEAVES = ("w_up", "w_down", "w_gate", "b_up", "b_down", "b_gate")


class ExpertParallelMoE(nn.Module):
    """One rank's part of an expert-parallel MoE layer; see the module docstring and placement.py."""

    def __init__(self, spec: LayerSpec, weights: Mapping[str, torch.Tensor] | None = None, *, group=None,
                 shared_group=None, seed: int = 0, generator: torch.Generator | None = None):
        """`weights`: this rank's shard (canonical names, shapes of placement.py). None: the shard of the
        seeded global init, so every rank agrees without communication.

        `group`: the EP process group (default: the whole world). `shared_group`: a second group over the
        same ranks for tensor-parallel shared experts. It must be distinct from `group` because autograd
        may run the backward of the routed and the shared branch in a different order on different ranks,
        and collectives must come in the same order per group. Left out, it is created here with
        dist.new_group, which is collective over the DEFAULT group: every process of the world must then
        construct its layers in the same order (create the group yourself when EP groups are subgroups)."""
        super().__init__()
        if not dist.is_initialized():
            raise BackendError("ExpertParallelMoE needs torch.distributed: call dist.init_process_group first "
                               "(torchrun, or backends.expert_parallel.launch.spawn_local)")
        self.spec = spec
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.placement = self.check_spec(spec, self.world)
        self.generator = generator
        graph = build_graph(spec)
        if weights is None:
            weights = shard_weights(init_weights(graph, seed), spec, self.rank, self.world)
        self._names: list[str] = []
        for name, value in graph.weights.items():
            want = [int(d) for d in value.type.shape]
            dim = self.placement.shard_dim(name)
            if dim is not None:
                want[dim] //= self.world
            if name not in weights:
                raise WeightsError(f"rank {self.rank}: weight {name} is missing from the shard")
            tensor = weights[name]
            if list(tensor.shape) != want:
                raise WeightsError(f"rank {self.rank}: weight {name} has shape {list(tensor.shape)}; this rank's "
                                   f"shard needs {want} (see backends/expert_parallel/placement.py)")
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, _Params())
                owner = owner._modules[part]
            tensor = tensor.detach().clone()
            if value.kind == ValueKind.BUFFER:
                owner.register_buffer(leaf, tensor)
            else:
                owner.register_parameter(leaf, nn.Parameter(tensor))
            self._names.append(name)
        self._shared_group = None
        if self.placement.shared_tp and self.world > 1:
            if shared_group is None:
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
                shared_group = dist.new_group(ranks)
            if shared_group is group or dist.get_world_size(shared_group) != self.world:
                raise BackendError("shared_group must be a second group over the same ranks as the EP group")
            self._shared_group = shared_group

    @staticmethod
    def check_spec(spec: LayerSpec, world: int) -> Placement:
        """The placement of `spec` on `world` ranks, or the BackendError the layer would raise; needs no
        process group, so launchers can refuse a spec before starting any process."""
        if spec.router.choice != Choice.TOKEN:
            raise BackendError("the expert-parallel layer supports token-choice routing; expert-choice needs every "
                               "token of the batch in one place per expert")
        if not spec.dropless:
            raise BackendError("the expert-parallel layer is dropless; remove capacity.factor from the spec")
        return Placement.of(spec, world)

    @classmethod
    def from_global(cls, spec: LayerSpec, weights: Mapping[str, torch.Tensor], *, group=None,
                    **kwargs) -> "ExpertParallelMoE":
        """This rank's layer from the global canonical weights (every rank passes the same dict)."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        return cls(spec, shard_weights(weights, spec, rank, world), group=group, **kwargs)

    # -- weights --------------------------------------------------------------------------------

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """This rank's shard by canonical name (the state dict, parameters and buffers)."""
        return {name: self.get_parameter(name) if name != ROUTER_BIAS else self.get_buffer(name)
                for name in self._names}

    def gather_global_weights(self) -> dict[str, torch.Tensor]:
        """The global canonical weights, assembled on every rank (all_gather of the equal-sized shards)."""
        local = self.canonical_weights()
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for name, tensor in local.items():
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            dist.all_gather(parts, tensor.detach().contiguous(), group=self.group)
            for r, part in enumerate(parts):
                shards[r][name] = part
        return unshard_weights(shards, self.spec)

    def replicated_parameters(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if self.placement.shard_dim(name) is None}

    @torch.no_grad()
    def sync_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the group (each rank's covers its tokens only).
        Expert (and tensor-parallel shared) gradients are complete on their rank already."""
        for p in self.replicated_parameters().values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.group)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
        """Aux-loss-free balancing after a step: b_i += γ·sign(mean load − load_i) on the GLOBAL load
        (the local counts are summed over the group first, so every replica of the bias stays equal)."""
        if ROUTER_BIAS not in self._names:
            raise BackendError("update_bias needs a router bias: the spec has no balance.aux_free")
        if gamma is None:
            gamma = self.spec.balance.aux_free.gamma
        load = tokens_per_expert.detach().to(torch.float64).clone()
        dist.all_reduce(load, group=self.group)
        bias = self.get_buffer(ROUTER_BIAS)
        bias += (gamma * torch.sign(load.mean() - load)).to(bias.dtype)
        return bias

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.experts.w_up.dtype

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> EPOutput:
        spec, e, r = self.spec, self.spec.experts, self.spec.router
        if x.dim() != 3 or x.shape[-1] != spec.hidden:
            raise ValueError(f"expected x [B, S, {spec.hidden}], got {list(x.shape)}")
        tokens = x.reshape(-1, spec.hidden).to(self.compute_dtype)

        logits, scores = self._router(tokens)
        bias = self.get_buffer(ROUTER_BIAS).to(scores.dtype) if ROUTER_BIAS in self._names else None
        gl = spec.routing_group_limit
        groups = (gl.groups, gl.kept, gl.score) if gl is not None else (1, 1, None)
        expert_idx, weights = route_topk(scores, bias, e.top_k, *groups)
        weights = scale_weights(weights, r.normalize, r.scaling)

        routed, chosen, comm = self._routed(tokens, expert_idx, weights)
        out = routed
        if e.shared:
            out = out + self._shared(tokens)

        tokens_per_expert = chosen.sum(dim=0)
        routing = {"expert_idx": expert_idx, "weights": weights, "router_logits": logits,
                   "tokens_per_expert": tokens_per_expert}
        sent_to = torch.tensor(comm.send_rows, dtype=scores.dtype, device=scores.device)
        losses = self._losses(scores, expert_idx, logits, x.shape[1], tokens_per_expert, sent_to)
        return EPOutput(out.view(x.shape[0], x.shape[1], spec.hidden), routing, losses, comm)

    def _router(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.spec.router
        # As the reference Linear: the router dtype, except that float64 activations stay float64.
        rdt = torch.float64 if tokens.dtype == torch.float64 else r.dtype.torch
        logits = F.linear(tokens.to(rdt), self.router.weight.to(rdt))
        if r.noise is not None and self.training:
            w_noise = self.get_parameter(ROUTER_NOISE_WEIGHT).to(rdt)
            noise = torch.randn(logits.shape, generator=self.generator, dtype=rdt, device=logits.device)
            logits = logits + r.noise.std * noise * F.softplus(F.linear(tokens.to(rdt), w_noise))
        scores = torch.softmax(logits, dim=-1) if r.score == ScoreFn.SOFTMAX else torch.sigmoid(logits)
        return logits, scores

    def _routed(self, tokens: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor):
        t, h = tokens.shape
        d, local = self.world, self.placement.local_experts
        n = self.spec.experts.routed
        dev = tokens.device
        chosen = torch.zeros(t, n, dtype=torch.bool, device=dev).scatter_(1, expert_idx, True)
        gate = torch.zeros(t, n, dtype=weights.dtype, device=dev).scatter(1, expert_idx, weights)
        chosen_by_rank = chosen.view(t, d, local)
        # One row per (token, destination rank), ordered by rank then token: all_to_all_single's layout.
        dest, token_of_row = chosen_by_rank.any(dim=-1).t().nonzero(as_tuple=True)
        send_counts = torch.bincount(dest, minlength=d)
        recv_counts = exchange_counts(send_counts, self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()

        payload = torch.cat([tokens[token_of_row],
                             gate.view(t, d, local)[token_of_row, dest].to(tokens.dtype),
                             chosen_by_rank[token_of_row, dest].to(tokens.dtype)], dim=1)
        arrived = all_to_all_rows(payload, recv, send, self.group)
        rx, rgate, rmask = arrived.split([h, local, local], dim=1)
        y = self._local_experts(rx, rgate, rmask > 0.5)
        back = all_to_all_rows(y, send, recv, self.group)
        routed = tokens.new_zeros(t, h).index_add(0, token_of_row, back)

        row_bytes = payload.shape[1] * payload.element_size()
        back_bytes = h * tokens.element_size()
        me = self.rank
        sent_rows = sum(send) - send[me]
        recv_rows = sum(recv) - recv[me]
        comm = CommStats(send_rows=send, recv_rows=recv,
                         bytes_sent=sent_rows * row_bytes + recv_rows * back_bytes,
                         bytes_received=recv_rows * row_bytes + sent_rows * back_bytes)
        return routed, chosen, comm

    def _local_experts(self, rx: torch.Tensor, rgate: torch.Tensor, rmask: torch.Tensor) -> torch.Tensor:
        """y[r] = Σ_{j chosen by row r} gate[r, j] · FFN_j(rx[r]) over this rank's experts."""
        if rx.shape[0] == 0:
            # Keep the empty result attached to the autograd graph: every rank must run the reverse
            # all-to-all in backward, including one that served no token.
            return rx.clone()
        act = self.spec.experts.activation
        ex = self.experts
        pick = lambda leaf, j: getattr(ex, leaf)[j] if hasattr(ex, leaf) else None  # noqa: E731
        y = torch.zeros_like(rx)
        for j in range(self.placement.local_experts):
            sel = rmask[:, j].nonzero(as_tuple=True)[0]
            if sel.numel() == 0:
                continue
            out = ffn_math(rx[sel], *(pick(leaf, j) for leaf in _FFN_LEAVES), act, WeightLayout.SEPARATE)
            y = y.index_add(0, sel, out * rgate[sel, j].unsqueeze(-1))
        return y

    def _shared(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.spec.experts
        act = e.activation

        def weights_of(i: int, with_b_down: bool):
            mod = self.shared._modules[str(i)]
            w = [getattr(mod, leaf, None) for leaf in _FFN_LEAVES]
            if not with_b_down:
                w[4] = None
            return w

        if self._shared_group is None:
            total = None
            for i in range(e.shared):
                y = ffn_math(tokens, *weights_of(i, True), act, WeightLayout.SEPARATE)
                total = y if total is None else total + y
        else:
            t, d = tokens.shape[0], self.world
            counts = gather_counts(t, d, tokens.device, self._shared_group)
            everyone = all_to_all_rows(tokens.repeat(d, 1), counts, [t] * d, self._shared_group)
            partial = None
            for i in range(e.shared):
                y = ffn_math(everyone, *weights_of(i, False), act, WeightLayout.SEPARATE)
                partial = y if partial is None else partial + y
            # Each rank's partial sums for rank s's tokens go to rank s, which adds the D partials.
            parts = all_to_all_rows(partial, [t] * d, counts, self._shared_group)
            total = parts.view(d, t, tokens.shape[1]).sum(dim=0)
            for i in range(e.shared):
                b_down = getattr(self.shared._modules[str(i)], "b_down", None)
                if b_down is not None:
                    total = total + b_down
        if e.shared_gate:
            total = total * torch.sigmoid(F.linear(tokens, self.get_parameter(SHARED_GATE_WEIGHT)))
        return total

    def _losses(self, scores, expert_idx, logits, seq_len, tokens_per_expert, sent_to) -> dict[str, torch.Tensor]:
        spec, b = self.spec, self.spec.balance
        k, t = spec.experts.top_k, scores.shape[0]
        out: dict[str, torch.Tensor] = {}
        if t == 0:
            return out  # no tokens: nothing to balance on this rank
        for name, alpha in b.losses.items():
            kind = LossKind(name)
            if kind == LossKind.DEVICE:
                out[name] = device_balance_loss(alpha, scores, tokens_per_expert, k, self.world)
            elif kind == LossKind.Z:
                out[name] = z_loss(alpha, logits)
            else:
                out[name] = balance_loss_math(kind, alpha, 1, k, scores, expert_idx, logits, seq_len)
        p = spec.parallel
        if p is not None and p.communication is not None:
            limit = p.device_limit if p.device_limit is not None else min(k, self.world)
            out["communication"] = communication_balance_loss(p.communication, scores, sent_to, limit, self.world)
        return out
