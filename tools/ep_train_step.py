"""Expert-parallel training steps on N local CPU processes (gloo over loopback), N = 1, 2, 4 by default.

Each rank holds routed/N experts and its own batch of tokens; a step is forward, backward of
sum(out²)/T + aux losses, the sum of the replicated gradients over the group, and an SGD update. The
table shows, per world size and rank, the token rows it dispatched and served, the all-to-all bytes it
sent and received to/from other ranks (both all-to-alls of the routed path, as CommStats counts them)
and the median step time over the timed steps (after warm-up), the slowest rank's being the step time.

    python tools/ep_train_step.py                        # specs/tiny.yaml-like layer, 1/2/4 processes
    python tools/ep_train_step.py --spec specs/deepseek-v2.yaml --hidden 256 --width 64 --tokens 512
    python tools/ep_train_step.py --device-limit 2 --procs 4

The same step under torchrun (one process per rank, gloo on CPU or NCCL on GPUs):

    torchrun --standalone --nproc-per-node 4 tools/ep_train_step.py --torchrun
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from moe_ir.backends.expert_parallel import ExpertParallelMoE, init_from_env, spawn_local
from moe_ir.builder import build_graph
from moe_ir.errors import MoeIRError
from moe_ir.frontends import load_spec
from moe_ir.params import init_weights
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


def run_rank(rank: int, world: int, args: argparse.Namespace, out_dir: str | None) -> dict:
    spec = layer_spec(args, world)
    weights = init_weights(build_graph(spec), seed=0)
    layer = ExpertParallelMoE.from_global(spec, weights)
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


def _spawned(rank: int, world: int, args: argparse.Namespace, out_dir: str) -> None:
    run_rank(rank, world, args, out_dir)


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
        rank, world = init_from_env()
        row = run_rank(rank, world, args, None)
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            print(json.dumps(rows, indent=2)) if args.json else print_table(rows)
        dist.destroy_process_group()
        return 0

    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            spawn_local(_spawned, world, args, tmp)
            rows += [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
