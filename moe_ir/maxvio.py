"""MaxVio, the load-imbalance measure of the aux-loss-free paper (arXiv 2408.15664):

    MaxVio = (max_i load_i − mean_i load_i) / mean_i load_i

0 is perfectly balanced; E − 1 means one expert took everything. `maxvio(load)` scores one layer's
tokens-per-expert; `MaxVioTracker` accumulates per layer over the steps of a run and reports each
step's value, the run mean per layer, and MaxVio_global (the measure applied to the load summed over
the whole run, as the paper's "global" variant).

Command line: `python -m moe_ir.maxvio LOADS.json` where the file maps layer name -> list of per-step
tokens-per-expert lists (the format `MaxVioTracker.to_json` writes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["maxvio", "MaxVioTracker", "main"]


def maxvio(load: torch.Tensor | Sequence[float]) -> float:
    """(max load − mean load) / mean load of one layer's tokens-per-expert [E] (0.0 for no tokens)."""
    t = torch.as_tensor(load, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError("maxvio needs the load of at least one expert")
    mean = t.mean()
    if mean <= 0:
        return 0.0
    return float((t.max() - mean) / mean)


class MaxVioTracker:
    """Collects tokens-per-expert per layer per step; nothing global, one tracker per run."""

    def __init__(self) -> None:
        self.loads: dict[str, list[list[float]]] = {}

    def update(self, loads: Mapping[str, torch.Tensor | Sequence[float]]) -> dict[str, float]:
        """Record one step (layer name -> tokens per expert); returns that step's MaxVio per layer."""
        out = {}
        for layer, load in loads.items():
            values = torch.as_tensor(load, dtype=torch.float64).reshape(-1).tolist()
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
            total = torch.tensor(window, dtype=torch.float64).sum(dim=0)
            out[layer] = {"batch_mean": sum(per_step) / len(per_step), "global": maxvio(total),
                          "steps": float(len(window))}
        return out

    def to_json(self) -> str:
        return json.dumps(self.loads)

    @classmethod
    def from_json(cls, text: str) -> "MaxVioTracker":
        tracker = cls()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a loads file maps layer name -> list of per-step tokens-per-expert lists")
        tracker.loads = {str(k): [list(map(float, s)) for s in v] for k, v in data.items()}
        return tracker


def format_summary(summary: Mapping[str, Mapping[str, float]]) -> Iterable[str]:
    yield f"{'layer':<16} {'steps':>6} {'MaxVio (mean per step)':>24} {'MaxVio (global)':>16}"
    for layer, s in summary.items():
        yield f"{layer:<16} {int(s['steps']):>6} {s['batch_mean']:>24.4f} {s['global']:>16.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_ir.maxvio", description=__doc__.split("\n\n")[0])
    parser.add_argument("loads", type=Path, help="JSON: layer -> list of per-step tokens-per-expert lists")
    parser.add_argument("--last", type=int, default=None, help="only the last N steps")
    args = parser.parse_args(argv)
    try:
        tracker = MaxVioTracker.from_json(args.loads.read_text())
    except (OSError, ValueError) as err:
        print(f"error: {args.loads}: {err}", file=sys.stderr)
        return 1
    for line in format_summary(tracker.summary(args.last)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
