"""Expert-parallel training steps on N local CPU processes (gloo over loopback), N = 1, 2, 4 by default.

The layer is lowered from the spec's training graph (ExpertParallelMoE.from_spec: the graph after the
backend's passes, with the spec's placement options). Each rank holds routed/N experts and its own batch of
tokens; a step is forward, backward of
sum(out²)/T + aux losses, the sum of the replicated gradients over the group, and an SGD update. The
table shows, per world size and rank, the token rows it dispatched and served, the all-to-all bytes it
sent and received to/from other ranks (both all-to-alls of the routed path, as CommStats counts them)
and the median step time over the timed steps (after warm-up), the slowest rank's being the step time.

    python tools/ep_train_step.py                        # specs/tiny.yaml-like layer, 1/2/4 processes
    python tools/ep_train_step.py --spec specs/deepseek-v2.yaml --hidden 256 --width 64 --tokens 512
    python tools/ep_train_step.py --device-limit 2 --procs 4

The same step under torchrun (one process per rank, gloo on CPU or NCCL on GPUs):

    torchrun --standalone --nproc-per-node 4 tools/ep_train_step.py --torchrun

Local processes meet through a file store and listen on loopback only; a collective waits at most
--timeout seconds (default 60), so a rank that dies or stops ends the run with one error line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_ir.backends.expert_parallel import DEFAULT_TIMEOUT, ExpertParallelMoE, init_from_env, spawn_local
from moe_ir.errors import MoeIRError
from moe_ir.frontends import load_spec
from moe_ir.spec import LayerSpec, spec_from_dict, spec_to_dict

DEFAULT_SPEC = {"name": "ep-demo", "hidden": 128, "experts": {"routed": 16, "width": 64, "top_k": 4, "shared": 1},
                "router": {"normalize": True},
                "balance": {"expert": 0.01}}


def layer_spec(args: argparse.Namespace, world: int) -> LayerSpec:
    data = spec_to_dict(load_spec(args.spec)) if args.spec else json.loads(json.dumps(DEFAULT_SPEC))
    data.pop("capacity", None)  # the expert-parallel layer is dropless
    if args.hidden:
        data["hidden"] = args.hidden
    if args.width:
        data["experts"]["width"] = args.width
        data["experts"].pop("shared_width", None)
    data["dtype"] = "float32"
    data["router"] = {**data.get("router", {}), "dtype": "float32"}
    balance = data.setdefault("balance", {})
    balance.pop("device", None)
    if world > 1:
        balance["device"] = {"alpha": 0.05, "devices": world}
    parallel = {"expert_parallel": world, "communication": 0.02}
    if args.device_limit and world > args.device_limit:
        parallel["device_limit"] = args.device_limit
    if data["router"].get("group_limit") and (world == 1 or "device_limit" in parallel):
        data["router"].pop("group_limit")  # one limit at a time; the device limit replaces the group limit
    data["parallel"] = parallel
    return spec_from_dict(data)


# The numbers a rank reports, in the order the torchrun path gathers them as one float64 tensor per rank.
ROW_FIELDS = ("world", "rank", "tokens", "sent_rows", "served_rows", "bytes_sent", "bytes_received", "step_ms",
              "device_limit")


def run_rank(rank: int, world: int, args: argparse.Namespace, out_dir: str | None) -> dict:
    spec = layer_spec(args, world)
    layer = ExpertParallelMoE.from_spec(spec, seed=0)  # the same seeded global init on every rank
    opt = torch.optim.SGD(layer.parameters(), lr=1e-2)
    tokens = args.tokens // world  # the global batch is split over the ranks
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(1, tokens, spec.hidden, generator=gen)
    times, stats = [], None
    for step in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        res = layer(x)
        loss = res.out.pow(2).sum() / max(tokens, 1) + res.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        layer.sync_replicated_grads()
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
        stats = res.comm
    row = {"world": world, "rank": rank, "tokens": tokens, "sent_rows": sum(stats.send_rows),
           "served_rows": sum(stats.recv_rows), "bytes_sent": stats.bytes_sent,
           "bytes_received": stats.bytes_received, "step_ms": 1e3 * statistics.median(times),
           "device_limit": spec.parallel.device_limit}
    if out_dir is not None:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(row))
    return row


def _spawned(rank: int, world: int, args: dict, out_dir: str) -> None:
    run_rank(rank, world, argparse.Namespace(**args), out_dir)


def _row_from_tensor(values: torch.Tensor) -> dict:
    """A rank's row back from its ROW_FIELDS vector: counts as ints, NaN (no device limit) as None."""
    return {key: value if key == "step_ms" else (None if math.isnan(value) else int(value))
            for key, value in zip(ROW_FIELDS, values.tolist())}


def print_table(rows: list[dict]) -> None:
    head = f"{'procs':>5} {'rank':>4} {'tokens':>6} {'rows out':>8} {'rows served':>11} {'a2a sent B':>11} " \
           f"{'a2a recv B':>11} {'step ms':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['world']:>5} {r['rank']:>4} {r['tokens']:>6} {r['sent_rows']:>8} {r['served_rows']:>11} "
              f"{r['bytes_sent']:>11,} {r['bytes_received']:>11,} {r['step_ms']:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="a layer spec (default: a 16-expert top-4 demo layer)")
    parser.add_argument("--procs", default="1,2,4", help="world sizes to run, comma-separated (default 1,2,4)")
    parser.add_argument("--tokens", type=int, default=256, help="global tokens per step (split over ranks)")
    parser.add_argument("--hidden", type=int, help="override the spec's hidden size")
    parser.add_argument("--width", type=int, help="override the routed expert width")
    parser.add_argument("--device-limit", type=int, help="M of device-limited routing where the world exceeds it")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds a collective may wait for the other ranks (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--torchrun", action="store_true", help="run as one rank of a torchrun launch")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.torchrun:
        worlds = [int(os.environ.get("WORLD_SIZE", "1"))]  # torchrun decides the world; --procs is unused
    else:
        try:
            worlds = [int(p) for p in args.procs.split(",")]
        except ValueError:
            parser.error(f"--procs takes comma-separated process counts, found {args.procs!r}")
        if any(w < 1 for w in worlds):
            parser.error(f"--procs takes positive process counts, found {args.procs!r}")
    if not args.timeout > 0:
        parser.error(f"--timeout takes a positive number of seconds, found {args.timeout}")
    try:
        # Refuse a spec before any process starts: an error inside spawned ranks is a traceback per rank.
        for world in worlds:
            ExpertParallelMoE.check_spec(layer_spec(args, world), world)
        return _run(args, worlds)
    except MoeIRError as err:
        print(f"ep_train_step: error: {err}", file=sys.stderr)
        return err.exit_code


def _run(args: argparse.Namespace, worlds: list[int]) -> int:
    if args.torchrun:
        rank, world = init_from_env(timeout=args.timeout)
        row = run_rank(rank, world, args, None)
        # Rows travel as tensors (no pickled objects): one float64 vector per rank, in ROW_FIELDS order.
        mine = torch.tensor([float(row[k]) if row[k] is not None else float("nan") for k in ROW_FIELDS],
                            dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        if rank == 0:
            rows = [_row_from_tensor(t) for t in everyone]
            print(json.dumps(rows, indent=2)) if args.json else print_table(rows)
        dist.destroy_process_group()
        return 0

    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            spawn_local(_spawned, world, vars(args), tmp, timeout=args.timeout)
            rows += [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
