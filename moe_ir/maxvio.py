"""MaxVio, the load-imbalance measure of the aux-loss-free paper (arXiv 2408.15664):

    MaxVio = (max_i load_i − mean_i load_i) / mean_i load_i

0 is perfectly balanced; E − 1 means one expert took everything. `maxvio(load)` scores one layer's
tokens-per-expert; `MaxVioTracker` accumulates per layer over the steps of a run and reports each
step's value, the run mean per layer, and MaxVio_global (the measure applied to the load summed over
the whole run, as the paper's "global" variant).

Command line: `moe-ir maxvio LOADS.json [--last N] [--json]` (or `python -m moe_ir.maxvio`), where the
file maps layer name -> list of per-step tokens-per-expert lists (the format `MaxVioTracker.to_json`
writes). `--json` prints {layer: {"batch_mean", "global", "steps"}} (the keys of `summary`).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["maxvio", "MaxVioTracker", "main"]


def _floats(load: Any) -> list[float]:
    """A load [E] as floats: a list, or a tensor/array of any shape (flattened). Plain Python, so the
    `moe-ir maxvio` command needs no torch."""
    if hasattr(load, "reshape") and hasattr(load, "tolist"):
        load = load.reshape(-1).tolist()
    return [float(v) for v in load]


def maxvio(load: Any) -> float:
    """(max load − mean load) / mean load of one layer's tokens-per-expert [E] (0.0 for no tokens)."""
    t = _floats(load)
    if not t:
        raise ValueError("maxvio needs the load of at least one expert")
    if not all(math.isfinite(v) and v >= 0 for v in t):
        raise ValueError(f"loads are token counts (finite, >= 0), found {t}")
    mean = math.fsum(t) / len(t)
    if mean <= 0:
        return 0.0
    return (max(t) - mean) / mean


class MaxVioTracker:
    """Collects tokens-per-expert per layer per step; nothing global, one tracker per run."""

    def __init__(self) -> None:
        self.loads: dict[str, list[list[float]]] = {}

    def update(self, loads: Mapping[str, Any]) -> dict[str, float]:
        """Record one step (layer name -> tokens per expert); returns that step's MaxVio per layer."""
        out = {}
        for layer, load in loads.items():
            values = _floats(load)
            self.loads.setdefault(layer, []).append(values)
            out[layer] = maxvio(values)
        return out

    def per_step(self, layer: str) -> list[float]:
        return [maxvio(step) for step in self.loads[layer]]

    def step_mean(self, step: int) -> float:
        """Mean over layers of one step's MaxVio."""
        values = [maxvio(steps[step]) for steps in self.loads.values()]
        return sum(values) / len(values)

    def summary(self, last: int | None = None) -> dict[str, dict[str, float]]:
        """Per layer: mean of the per-step MaxVio (over the `last` steps if given) and MaxVio_global."""
        out = {}
        for layer, steps in self.loads.items():
            window = steps[-last:] if last else steps
            per_step = [maxvio(s) for s in window]
            total = [math.fsum(column) for column in zip(*window)]
            out[layer] = {"batch_mean": sum(per_step) / len(per_step), "global": maxvio(total),
                          "steps": float(len(window))}
        return out

    def to_json(self) -> str:
        return json.dumps(self.loads)

    @classmethod
    def from_json(cls, text: str) -> "MaxVioTracker":
        """Parse a loads file; a malformed one raises ValueError naming the layer and step."""
        tracker = cls()
        try:
            data = json.loads(text)
        except RecursionError:  # the C decoder recurses per nesting level
            raise ValueError("the JSON nests too deeply to be a loads file") from None
        if not isinstance(data, dict):
            raise ValueError("a loads file maps layer name -> list of per-step tokens-per-expert lists")
        for layer, steps in data.items():
            if not isinstance(steps, list) or not steps:
                raise ValueError(f"layer {layer!r}: expected a non-empty list of per-step loads")
            rows: list[list[float]] = []
            for i, step in enumerate(steps):
                counts = [_count(v) for v in step] if isinstance(step, list) else []
                if not counts or any(c is None for c in counts):
                    raise ValueError(f"layer {layer!r}, step {i}: expected a non-empty list of token counts "
                                     f"(numbers >= 0), found {json.dumps(step)[:60]}")
                if rows and len(counts) != len(rows[0]):
                    raise ValueError(f"layer {layer!r}, step {i}: {len(counts)} experts, step 0 has {len(rows[0])}")
                rows.append(counts)
            tracker.loads[str(layer)] = rows
        return tracker


def _count(value: object) -> float | None:
    """A token count read from JSON as a float, or None when it is not a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        count = float(value)
    except OverflowError:  # an integer literal too large for a float
        return None
    return count if math.isfinite(count) and count >= 0 else None


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> Iterable[str]:
    yield f"{'layer':<16} {'steps':>6} {'MaxVio (mean per step)':>24} {'MaxVio (global)':>16}"
    for layer, s in summary.items():
        yield f"{layer:<16} {int(s['steps']):>6} {s['batch_mean']:>24.4f} {s['global']:>16.4f}"


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loads", type=Path, help="JSON: layer -> list of per-step tokens-per-expert lists")
    parser.add_argument("--last", type=int, default=None, metavar="N", help="only the last N steps")
    parser.add_argument("--json", action="store_true", help="print {layer: {batch_mean, global, steps}}")


def _run(args: argparse.Namespace, prog: str) -> int:
    if args.last is not None and args.last < 1:
        print(f"{prog}: error: --last must be at least 1, found {args.last}", file=sys.stderr)
        return 2
    try:
        tracker = MaxVioTracker.from_json(args.loads.read_text())
    except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        print(f"{prog}: error: {args.loads}: {err}", file=sys.stderr)
        return 1
    summary = tracker.summary(args.last)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for line in format_summary(summary):
        print(line)
    return 0


def add_command(subparsers) -> None:
    """`moe-ir maxvio`: the same report as `python -m moe_ir.maxvio`."""
    p = subparsers.add_parser("maxvio", help="MaxVio per layer and over a run, from a loads JSON file",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=lambda args: _run(args, "moe-ir"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_ir.maxvio", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return _run(parser.parse_args(argv), "python -m moe_ir.maxvio")


if __name__ == "__main__":
    raise SystemExit(main())
