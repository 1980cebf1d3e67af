"""An expert-parallel MoE layer on torch.distributed, lowered from a layer graph: each rank holds a block
of routed experts.

Every rank runs the layer on its own tokens x [B, S, H] (the ranks of the EP group are data-parallel
outside the layer). The module walks the graph's nodes like the eager module, through the one torch op
table (backends/torch_ops.py), except for what placement changes (lower.py):

1. routing runs locally on replicated router weights, exactly as the graph says (projection in the
   router dtype, score, noise, bias, group limit -- with groups = ranks that is DeepSeek-V2's device
   limit --, normalisation, scaling);
2. the routed path (dispatch -> grouped_ffn -> combine) becomes an exchange: a token goes ONCE to each
   rank holding at least one of its chosen experts (deduplicated per rank, so device-limited routing
   really bounds the traffic). The row sent is the token's hidden vector followed by its gate weights
   and a chosen-mask for that rank's L experts ([H + 2L] values in the activation dtype, which is where
   the reference applies the weights too). Split sizes go first in an all-to-all of counts, then the
   rows in one `all_to_all_single` with variable splits. The receiving rank lays the rows out as the
   dispatch does (sorted by its local expert) and runs the shared grouped-FFN and combine kernels on
   them; the reverse all-to-all brings one [H] row per (token, rank) back, summed into the token;
3. shared experts (ffn nodes) run locally on replicated weights, or tensor-parallel: every rank's tokens
   are gathered (all-to-all), each rank applies its 1/EP slice of the ffn's width to all of them, and
   the partial outputs go back to their tokens' rank and are summed there (an all-to-all reduce-scatter:
   the ranks hold different tokens, so a plain all_reduce would not do); b_down is added once, after.

Dropless (every assignment is computed). Backward runs through the same all-to-alls in reverse
(`comm.all_to_all_rows`). forward returns `EPOutput(out, routing, losses, comm)`: the graph's outputs
(routing record, `loss.<kind>` as losses[kind]) on this rank's tokens, plus the communication balance
loss when asked for, and what this rank moved; nothing is stored on the side. Gradients of replicated
parameters cover this rank's tokens; `sync_replicated_grads()` sums them over the group.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from moe_ir.builder import build_graph
from moe_ir.errors import BackendError, WeightsError
from moe_ir.ir import Graph, Node, OpCode, Value
from moe_ir.params import init_weights
from moe_ir.passes import run_pipeline
from moe_ir.spec import LayerSpec, SharedPlacement
from .. import torch_kernels as K
from ..torch_ops import dense_ffn, expert_ffns, kernel_ffn_attrs, lower_node, node_results
from ..torch_params import register_graph_weights
from .comm import all_to_all_rows, exchange_counts, gather_counts
from .losses import communication_balance_loss
from .lower import RoutedPath, check_graph, routed_path
from .placement import shard_weights, unshard_weights

__all__ = ["CommStats", "EPOutput", "ExpertParallelMoE", "PIPELINE"]

# The passes the expert-parallel lowering runs (the backend's pipeline): shared experts fused into one
# wider ffn, so tensor-parallel shared experts gather the tokens and reduce the partial sums once.
PIPELINE = ("fuse-shared-experts", "dce")

_LOSS_PREFIX = "loss."
_NOT_ROUTING = ("out", "aux_loss")


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
    routing: dict[str, torch.Tensor]    # the graph's routing outputs: expert_idx, weights [T,k]; router_logits...
    losses: dict[str, torch.Tensor]     # by kind: the graph's losses, and communication when asked for
    comm: CommStats

    @property
    def aux_loss(self) -> torch.Tensor:
        total = self.out.new_zeros(())
        for loss in self.losses.values():
            total = total + loss
        return total


class _Step(NamedTuple):
    run: Callable[[list, Mapping[str, Any]], tuple]   # (operands, run-time arguments) -> one value per output
    inputs: tuple[str | None, ...]
    outputs: tuple[str, ...]


def _stored_source(value: Value) -> Value:
    """A stored weight `value` is made of (itself, or the first part of a concat/add of weights)."""
    while not value.is_weight:
        value = next(v for v in value.producer.inputs if v is not None)
    return value


class ExpertParallelMoE(nn.Module):
    """One rank's part of an expert-parallel MoE layer lowered from a layer graph; see the module docstring."""

    def __init__(self, graph: Graph, weights: Mapping[str, torch.Tensor] | None = None, *, group=None,
                 shared_group=None, shared: SharedPlacement = SharedPlacement.REPLICATED,
                 communication: float | None = None, gamma: float | None = None, seed: int = 0,
                 generator: torch.Generator | None = None):
        """`graph`: a layer graph, after the passes (PIPELINE, or any the lowering supports: check_graph).
        `weights`: this rank's shard (the graph's weight names, shapes of placement.py). None: the shard of
        the seeded global init, so every rank agrees without communication.

        Placement facts the graph does not carry are options: `shared` (replicated or tensor_parallel
        shared experts), `communication` (α3 of the communication balance loss, computed only here since
        it depends on the placement) and `gamma` (γ of aux-loss-free balancing, for update_bias).

        `group`: the EP process group (default: the whole world). `shared_group`: a second group over the
        same ranks for tensor-parallel shared experts. It must be distinct from `group` because autograd
        may run the backward of the routed and the shared branch in a different order on different ranks,
        and collectives must come in the same order per group. Left out, it is created here with
        dist.new_group, which is collective over the DEFAULT group: every process of the world must then
        construct its layers in the same order (create the group yourself when EP groups are subgroups)."""
        super().__init__()
        if not dist.is_initialized():
            raise BackendError("ExpertParallelMoE needs torch.distributed: call dist.init_process_group first "
                               "(torchrun, or moe_ir.backends.expert_parallel.spawn_local)")
        self.graph = graph
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        shared = SharedPlacement(shared)
        self.placement = check_graph(graph, self.world, shared)
        self.path: RoutedPath = routed_path(graph)
        self.communication = communication
        self.gamma = gamma
        self.generator = generator  # for the router noise; None: the global RNG
        if weights is None:
            weights = shard_weights(init_weights(graph, seed), self.placement, self.rank)
        self._register_weights(weights)
        self._shared_group = None
        if self.placement.shared_tp and self.world > 1:
            if shared_group is None:
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(self.world))
                shared_group = dist.new_group(ranks)
            if shared_group is group or dist.get_world_size(shared_group) != self.world:
                raise BackendError("shared_group must be a second group over the same ranks as the EP group")
            self._shared_group = shared_group
        self._plan = [step for node in graph.nodes if (step := self._lower(node)) is not None]
        self._input = graph.inputs[0].name
        self._outputs = [(key, v.name) for key, v in graph.outputs.items()]
        self._compute_weight = _stored_source(self.path.experts.input("w_up")).name
        self._scores = self.path.route.inputs[0].name
        bias = self.path.route.input("bias")
        self._bias = bias.name if bias is not None and bias.is_weight else None
        self._expert_slots = self.placement.expert_slots()

    def _register_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.graph.weights) - set(weights))
        local_shape = lambda name: self.placement.local_shape(name, self.rank)  # noqa: E731
        wrong = [f"{name}: expected {list(local_shape(name))}, found {list(weights[name].shape)}"
                 for name in self.graph.weights if name in weights and tuple(weights[name].shape) != local_shape(name)]
        if missing or wrong:
            raise WeightsError(f"rank {self.rank}: the weight shard does not match the placement (see "
                               f"backends/expert_parallel/placement.py): missing {missing}"
                               + (f", wrong shape: {'; '.join(wrong)}" if wrong else ""))
        self._slots = register_graph_weights(self, self.graph, weights)

    # -- lowering ---------------------------------------------------------------------------------------

    def _lower(self, node: Node) -> _Step | None:
        inputs = tuple(None if v is None else v.name for v in node.inputs)
        outputs = tuple(v.name for v in node.outputs)
        path = self.path
        if node is path.dispatch or node is path.experts:
            return None  # part of the exchange, which runs where the combine was
        if node is path.combine:
            experts = path.experts
            operands = (experts.input("x"), path.dispatch.input("expert_idx"), path.dispatch.input("weights"),
                        *experts.inputs[3:9])
            attrs = kernel_ffn_attrs(experts)
            return _Step(lambda ops, rt: self._exchange(*ops, *attrs, record=rt["record"]),
                         tuple(None if v is None else v.name for v in operands),
                         (node.outputs[0].name, path.dispatch.outputs[2].name))
        if node.op == OpCode.FFN and self._shared_group is not None:
            attrs = kernel_ffn_attrs(node)
            return _Step(lambda ops, rt: (self._tensor_parallel_ffn(*ops, *attrs),), inputs, outputs)
        call = lower_node(node)
        if node.op == OpCode.BALANCE_LOSS:
            def loss(ops, rt, call=call):
                if ops[0].shape[0] == 0:
                    return (ops[0].new_zeros(()),)  # no tokens on this rank: nothing to balance
                return (call(ops, rt),)
            return _Step(loss, inputs, outputs)
        return _Step(lambda ops, rt, call=call, node=node: node_results(node, call(ops, rt)), inputs, outputs)

    # -- construction helpers ---------------------------------------------------------------------------

    @classmethod
    def from_global(cls, graph: Graph, weights: Mapping[str, torch.Tensor], *, group=None,
                    shared: SharedPlacement = SharedPlacement.REPLICATED, **kwargs) -> "ExpertParallelMoE":
        """This rank's layer from the global weights of the graph (every rank passes the same dict)."""
        placement = check_graph(graph, dist.get_world_size(group), shared)
        return cls(graph, shard_weights(weights, placement, dist.get_rank(group)), group=group, shared=shared,
                   **kwargs)

    @classmethod
    def from_spec(cls, spec: LayerSpec, weights: Mapping[str, torch.Tensor] | None = None, *, group=None,
                  seed: int = 0, **kwargs) -> "ExpertParallelMoE":
        """This rank's layer of `spec`: its training graph after PIPELINE, with the spec's placement options
        (parallel.shared, parallel.communication, balance.aux_free.gamma). `weights`: the global weights
        (every rank the same), or None for the seeded init. The graph decides everything else."""
        world = dist.get_world_size(group)
        options = cls.check_spec(spec, world)
        graph = run_pipeline(build_graph(spec, training=True), PIPELINE)
        if weights is None:
            weights = init_weights(graph, seed)
        return cls.from_global(graph, {k: v for k, v in weights.items() if k in graph.weights}, group=group,
                               **options, **kwargs)

    @staticmethod
    def check_spec(spec: LayerSpec, world: int) -> dict[str, Any]:
        """The placement options of `spec` on `world` ranks, or the BackendError the layer would raise;
        needs no process group, so launchers can refuse a spec before starting any process."""
        p = spec.parallel
        ep = p.expert_parallel if p is not None else world
        if world != ep:
            raise BackendError(f"spec '{spec.name}' sets parallel.expert_parallel={ep} but the process group has "
                               f"{world} ranks; launch {ep} processes or change the spec")
        shared = p.shared if p is not None else SharedPlacement.REPLICATED
        check_graph(build_graph(spec), world, shared)
        aux_free = spec.balance.aux_free
        return {"shared": shared, "communication": p.communication if p is not None else None,
                "gamma": aux_free.gamma if aux_free is not None else None}

    # -- weights ----------------------------------------------------------------------------------------

    def canonical_weights(self) -> dict[str, torch.Tensor]:
        """This rank's shard by stored name (the state dict, parameters and buffers)."""
        return {name: getattr(owner, leaf) for name, owner, leaf in self._slots}

    def gather_global_weights(self) -> dict[str, torch.Tensor]:
        """The global weights, assembled on every rank (all_gather of the equal-sized shards)."""
        shards: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]
        for name, tensor in self.canonical_weights().items():
            parts = [torch.empty_like(tensor) for _ in range(self.world)]
            dist.all_gather(parts, tensor.detach().contiguous(), group=self.group)
            for r, part in enumerate(parts):
                shards[r][name] = part
        return unshard_weights(shards, self.placement)

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
        if self._bias is None:
            raise BackendError("update_bias needs a router bias: the spec has no balance.aux_free")
        gamma = gamma if gamma is not None else self.gamma
        if gamma is None:
            raise BackendError("update_bias needs γ: build the layer with from_spec(...) or pass gamma=")
        load = tokens_per_expert.detach().to(torch.float64).clone()
        dist.all_reduce(load, group=self.group)
        return K.update_bias(self.get_buffer(self._bias), load, gamma)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype: that of the expert weights (follows .double() / .to(dtype))."""
        return self.get_parameter(self._compute_weight).dtype

    # -- forward ----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> EPOutput:
        hidden = self.graph.inputs[0].type.shape[-1]
        if x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"expected x [B, S, {hidden}], got {list(x.shape)}")
        env: dict[str, Any] = {self._input: x.to(self.compute_dtype)}
        for name, owner, leaf in self._slots:
            env[name] = getattr(owner, leaf)
        record: dict[str, CommStats] = {}
        runtime = {"training": self.training, "generator": self.generator, "expert_kernel": K.grouped_ffn,
                   "packed_expert_kernel": K.grouped_ffn_packed, "int4_activations": None, "record": record}
        for step in self._plan:
            results = step.run([None if name is None else env[name] for name in step.inputs], runtime)
            env.update(zip(step.outputs, results))
        routing, losses = {}, {}
        for key, name in self._outputs:
            if key.startswith(_LOSS_PREFIX):
                losses[key[len(_LOSS_PREFIX):]] = env[name]
            elif key not in _NOT_ROUTING:
                routing[key] = env[name]
        comm = record["comm"]
        if self.communication is not None:
            scores = env[self._scores]
            sent = torch.tensor(comm.send_rows, dtype=scores.dtype, device=scores.device)
            losses["communication"] = communication_balance_loss(self.communication, scores, sent,
                                                                 self.device_limit, self._expert_slots)
        return EPOutput(env[self.graph.outputs["out"].name], routing, losses, comm)

    @property
    def device_limit(self) -> int:
        """M, the most ranks a token is sent to: the kept groups when the top-k's groups are the ranks
        (DeepSeek-V2's device-limited routing), else min(top_k, ranks)."""
        groups, kept = self.path.device_limit_groups
        return kept if groups == self.world else min(self.path.route.attrs["k"], self.world)

    def _exchange(self, tokens, expert_idx, weights, w_up, w_down, w_gate, b_up, b_down, b_gate, activation, layout,
                  *, record):
        """The routed path across ranks: (out [T, H], tokens per expert [E] of this rank's tokens)."""
        t, h = tokens.shape
        d, local, n = self.world, self.placement.max_local_experts, self.placement.experts
        dev = tokens.device
        # [T, D, L]: each rank's block of experts side by side (padding slots of a smaller block never chosen).
        slots = self._expert_slots.to(dev)
        chosen_by_rank = torch.zeros(t, n + 1, dtype=torch.bool, device=dev).scatter_(1, expert_idx, True)[:, slots]
        gate_by_rank = torch.zeros(t, n + 1, dtype=weights.dtype, device=dev).scatter(1, expert_idx, weights)[:, slots]
        chosen_by_rank, gate_by_rank = chosen_by_rank.view(t, d, local), gate_by_rank.view(t, d, local)
        # One row per (token, destination rank), ordered by rank then token: all_to_all_single's layout.
        dest, token_of_row = chosen_by_rank.any(dim=-1).t().nonzero(as_tuple=True)
        send_counts = K.count_ids(dest, d)
        recv_counts = exchange_counts(send_counts, self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()

        payload = torch.cat([tokens[token_of_row],
                             gate_by_rank[token_of_row, dest].to(tokens.dtype),
                             chosen_by_rank[token_of_row, dest].to(tokens.dtype)], dim=1)
        arrived = all_to_all_rows(payload, recv, send, self.group)
        rx, rgate, rmask = arrived.split([h, local, local], dim=1)
        mine = w_down.shape[0]  # this rank's experts: the first `mine` slots of its block
        y = self._local_experts(rx, rgate[:, :mine], rmask[:, :mine] > 0.5,
                                (w_up, w_down, w_gate, b_up, b_down, b_gate), activation, layout)
        back = all_to_all_rows(y, send, recv, self.group)
        # Each row back is one rank's weighted sum for its token: the rows add up with weight 1.
        out = K.combine(back, token_of_row, back.new_ones(back.shape[0]), t)

        row_bytes = payload.shape[1] * payload.element_size()
        back_bytes = h * tokens.element_size()
        sent_rows = sum(send) - send[self.rank]
        recv_rows = sum(recv) - recv[self.rank]
        record["comm"] = CommStats(send_rows=send, recv_rows=recv,
                                   bytes_sent=sent_rows * row_bytes + recv_rows * back_bytes,
                                   bytes_received=recv_rows * row_bytes + sent_rows * back_bytes)
        return out, K.count_ids(expert_idx.reshape(-1), n)

    @staticmethod
    def _local_experts(rx, rgate, rmask, expert_weights, activation, layout):
        """y[r] = Σ_{j chosen by row r} gate[r, j] · FFN_j(rx[r]) over this rank's experts."""
        if rx.shape[0] == 0:
            # Keep the empty result attached to the autograd graph: every rank must run the reverse
            # all-to-all in backward, including one that served no token.
            return rx.clone()
        # The received rows as the dispatch lays out assignments: sorted by (local) expert, row order within.
        expert_of, rows = rmask.t().nonzero(as_tuple=True)
        group_sizes = K.count_ids(expert_of, rmask.shape[1])
        y = expert_ffns(rx, rows, group_sizes, *expert_weights, None, activation, layout, K.grouped_ffn,
                        K.grouped_ffn_packed)
        return K.combine(y, rows, rgate[rows, expert_of], rx.shape[0])

    def _tensor_parallel_ffn(self, tokens, w_up, w_down, w_gate, b_up, b_down, b_gate, activation, layout):
        """An ffn whose width is split over the ranks, on this rank's tokens [T, H]."""
        t, d, group = tokens.shape[0], self.world, self._shared_group
        counts = gather_counts(t, d, tokens.device, group)
        everyone = all_to_all_rows(tokens.repeat(d, 1), counts, [t] * d, group)
        partial = dense_ffn(everyone, w_up, w_down, w_gate, b_up, None, b_gate, activation, layout)
        # Each rank's partial sums for rank s's tokens go to rank s, which adds the D partials.
        parts = all_to_all_rows(partial, [t] * d, counts, group)
        total = parts.view(d, t, tokens.shape[1]).sum(dim=0)
        return total if b_down is None else total + b_down
