"""Expert parallelism on torch.distributed, lowered from the IR graph: routed experts in contiguous blocks
per rank, tokens moved with all_to_all_single (gloo on CPU, NCCL on GPU). The registered backend
`expert_parallel:N` runs a layer graph on N local processes. See README.md in this folder."""
from .backend import ExpertParallelBackend
from .comm import all_to_all_rows, exchange_counts, gather_rows
from .launch import DEFAULT_TIMEOUT, init_from_env, loopback_interface, spawn_local
from .losses import communication_balance_loss
from .lower import RoutedPath, check_graph, routed_path
from .module import PIPELINE, CommStats, EPOutput, ExpertParallelMoE
from .placement import Placement, shard_weights, unshard_weights

__all__ = ["DEFAULT_TIMEOUT", "PIPELINE", "CommStats", "EPOutput", "ExpertParallelBackend", "ExpertParallelMoE",
           "Placement", "RoutedPath", "all_to_all_rows", "check_graph", "communication_balance_loss",
           "exchange_counts", "gather_rows", "init_from_env", "loopback_interface", "routed_path", "shard_weights",
           "spawn_local", "unshard_weights"]
