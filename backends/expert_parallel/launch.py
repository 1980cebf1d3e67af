"""Starting an expert-parallel group: local CPU processes for tests and tools, or torchrun.

torchrun (one process per rank; it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

    torchrun --standalone --nproc-per-node 4 my_train.py          # one machine, 4 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 my_train.py                # 2 machines x 8 GPUs

and in my_train.py:

    from moe_ir.backends.expert_parallel import ExpertParallelMoE, init_from_env
    group_rank, world = init_from_env()        # NCCL when CUDA is there (device = LOCAL_RANK), else gloo
    layer = ExpertParallelMoE.from_global(spec, global_weights)   # spec.parallel.expert_parallel == world

Without torchrun, `spawn_local(fn, world)` starts `world` processes on this machine with gloo over
loopback (a free port from binding port 0), calls fn(rank, world, *args) in each, and tears the group
down; an exception in any rank is raised in the caller.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = ["free_port", "init_from_env", "spawn_local"]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """init_process_group from torchrun's environment; returns (rank, world size)."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _run_rank(rank: int, fn: Callable, world: int, port: int, backend: str, threads: int | None,
              args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo",
                threads: int | None = 1) -> None:
    """Run fn(rank, world, *args) in `world` fresh local processes joined in one process group.

    fn must be importable by name (a module-level function): the children are spawned, not forked.
    `threads` sets torch's intra-op threads per child (1 keeps N processes from oversubscribing cores)."""
    import torch.multiprocessing as mp

    mp.spawn(_run_rank, args=(fn, world, free_port(), backend, threads, args), nprocs=world, join=True)
