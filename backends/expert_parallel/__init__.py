"""Expert parallelism on torch.distributed: routed experts in contiguous blocks per rank, tokens moved
with all_to_all_single (gloo on CPU, NCCL on GPU). See README.md in this folder."""
from .comm import all_to_all_rows, exchange_counts
from .launch import free_port, init_from_env, spawn_local
from .losses import communication_balance_loss, device_balance_loss
from .module import CommStats, EPOutput, ExpertParallelMoE
from .placement import Placement, shard_weights, unshard_weights

__all__ = ["CommStats", "EPOutput", "ExpertParallelMoE", "Placement", "all_to_all_rows",
           "communication_balance_loss", "device_balance_loss", "exchange_counts", "free_port", "init_from_env",
           "shard_weights", "spawn_local", "unshard_weights"]
