"""Starting an expert-parallel group: local CPU processes for validation, tests and tools, or torchrun.

torchrun (one process per rank; it sets RANK, WORLD_SIZE, LOCAL_RANK and runs the rendezvous):

    torchrun --standalone --nproc-per-node 4 my_train.py          # one machine, 4 ranks
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 my_train.py                # 2 machines x 8 GPUs

and in my_train.py:

    from moe_ir.backends.expert_parallel import ExpertParallelMoE, init_from_env
    rank, world = init_from_env()        # NCCL when CUDA is there (device = LOCAL_RANK), else gloo
    layer = ExpertParallelMoE.from_spec(spec, global_weights)     # spec.parallel.expert_parallel == world

Without torchrun, `spawn_local(fn, world, *args)` starts `world` processes on this machine, calls
fn(rank, world, *args) in each, and tears the group down. It is built to be safe on a shared machine:

  * no network listener: the ranks meet through a FileStore in a private temporary folder (a TCP store
    would listen on every interface, whatever MASTER_ADDR says), and gloo's (or NCCL's) own sockets are
    bound to the loopback interface;
  * bounded waits: every collective and the rendezvous give up after `timeout` seconds (default 60), so
    a rank that dies, hangs or is stopped fails the run in seconds, not after torch's default 30 minutes;
  * clear failures: the launcher watches every rank; when one fails it stops the others and raises one
    BackendError naming the rank and the cause (an exception's message, a signal, or a timeout);
  * nothing pickled on the way back: a rank reports an error as one line of text in the private folder.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moe_ir.errors import BackendError, MoeIRError

__all__ = ["DEFAULT_TIMEOUT", "STOP_GRACE", "init_from_env", "loopback_interface", "spawn_local"]

DEFAULT_TIMEOUT = 60.0    # seconds a collective or the rendezvous may wait for the other ranks
STOP_GRACE = 2.0          # seconds the other ranks get to report their side of a failure before they are killed
_IFF_LOOPBACK = 0x8       # the loopback flag of /sys/class/net/<interface>/flags (linux/if.h)


def loopback_interface() -> str:
    """The name of this machine's loopback network interface ('lo' on Linux)."""
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text().strip(), 16)
        except (OSError, ValueError):
            continue
        if flags & _IFF_LOOPBACK:
            return name
    return next((name for name in names if name.startswith("lo")), "lo")


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """init_process_group from torchrun's environment with a bounded timeout; returns (rank, world size)."""
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def spawn_local(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo", threads: int | None = 1,
                timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run fn(rank, world, *args) in `world` fresh local processes joined in one process group.

    fn must be importable by name (a module-level function): the children are not forks of the caller, and
    args travel to them the way multiprocessing passes a new process its arguments (keep them plain:
    strings, numbers, paths). `threads` sets torch's intra-op threads per child (1 keeps N processes from
    oversubscribing cores). `timeout` bounds every collective and the rendezvous, in seconds. Raises
    BackendError when any rank fails, after stopping the others."""
    if world < 1:
        raise BackendError(f"expert parallelism needs at least 1 process, got {world}")
    if not timeout > 0:
        raise BackendError(f"the expert-parallel timeout must be positive, got {timeout}")
    context = _process_context()
    with tempfile.TemporaryDirectory(prefix="moe-ir-ep-") as meeting:  # mode 0700: this user's only
        processes = [context.Process(target=_run_rank, name=f"moe-ir-ep-rank{rank}", daemon=True,
                                     args=(rank, world, fn, args, meeting, backend, threads, timeout))
                     for rank in range(world)]
        killed: set[int] = set()
        try:
            for process in processes:
                process.start()
            failed = _wait_for_failure(processes)
            if failed is not None:
                killed = _stop(processes, time.monotonic() + STOP_GRACE)
        finally:
            killed |= _stop(processes, time.monotonic())  # an interrupt (Ctrl-C) of the launcher lands here
        if failed is not None:
            raise BackendError(_failure_message(processes, killed, Path(meeting), world, timeout))


def _process_context():
    """Where the ranks come from: a fork server that has imported torch and this package once (each rank
    then starts in a fraction of a second instead of importing torch again), or plain spawn where there is
    no fork server. Never a fork of the caller, whose threads and state a child must not inherit."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "torch.distributed", "moe_ir.backends.expert_parallel"])
        return context
    return multiprocessing.get_context("spawn")


# -- in each child ----------------------------------------------------------------------------------------


def _run_rank(rank: int, world: int, fn: Callable, args: tuple, meeting: str, backend: str, threads: int | None,
              timeout: float) -> None:
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        lo = loopback_interface()
        os.environ["GLOO_SOCKET_IFNAME"] = lo   # gloo's pair sockets on loopback, not on the host's address
        os.environ["NCCL_SOCKET_IFNAME"] = lo   # NCCL's bootstrap likewise (local GPUs)
        store = dist.FileStore(os.path.join(meeting, "store"), world)
        store.set_timeout(timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout))
        fn(rank, world, *args)
        dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - every failure becomes one line for the launcher
        Path(meeting, f"rank{rank}.error").write_text(_describe_error(err, timeout))
        # No destroy_process_group: with a peer gone it may wait; the launcher stops what is left.
        os._exit(1)


def _describe_error(err: BaseException, timeout: float) -> str:
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    lowered = text.lower()
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if "timed out" in lowered or "timeout" in lowered:
        return (f"a collective did not complete within the {timeout:g} s timeout: another rank stopped, hung or "
                "died (a slow but healthy run needs a larger timeout)")
    if "connection closed by peer" in lowered or "connection reset" in lowered or "broken pipe" in lowered:
        return "lost the connection to another rank (it exited or was killed)"
    if isinstance(err, MoeIRError):
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


# -- in the launcher --------------------------------------------------------------------------------------


def _wait_for_failure(processes: list) -> int | None:
    """Wait until every process has exited; the rank of the first one that failed, or None."""
    pending = {process.sentinel: rank for rank, process in enumerate(processes)}
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            rank = pending.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                return rank
    return None


def _stop(processes: list, deadline: float) -> set[int]:
    """Let the processes exit on their own until `deadline`, then SIGKILL the rest (which also ends a stopped
    process, where SIGTERM would wait for it to continue); the ranks killed here."""
    killed = set()
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))
    for rank, process in enumerate(processes):
        if process.pid is not None and process.is_alive():
            process.kill()
            process.join()
            killed.add(rank)
    return killed


def _failure_message(processes: list, killed: set[int], meeting: Path, world: int, timeout: float) -> str:
    """One line naming the rank that caused the failure: a rank that died of a signal first, then one that
    raised, then one whose collective timed out or lost its peer (those are consequences, not causes)."""
    causes: list[tuple[int, int, str]] = []
    for rank, process in enumerate(processes):
        if rank in killed or process.exitcode in (0, None):
            continue
        report = meeting / f"rank{rank}.error"
        if process.exitcode < 0:
            try:
                name = signal.Signals(-process.exitcode).name
            except ValueError:
                name = f"signal {-process.exitcode}"
            causes.append((0, rank, f"rank {rank} was killed by {name}"))
        elif report.exists():
            text = report.read_text()
            consequence = text.startswith(("a collective did not complete", "lost the connection"))
            causes.append((2 if consequence else 1, rank, f"rank {rank}: {text}"))
        else:
            causes.append((1, rank, f"rank {rank} exited with code {process.exitcode}"))
    if not causes:
        return f"expert-parallel run on {world} processes failed and stopped every rank"
    return f"expert-parallel run on {world} processes failed: {min(causes)[2]}"
