"""Cross-validation matrix: every shipped layer and model spec (as its miniature) against every backend.

    python tools/validate_matrix.py [--hidden 64] [--tokens 16] [--backends ...] [--specs specs/a.yaml ...] [--json]

Each cell is the backend's status against the reference interpreter on the same weights and input:
`ok` (max abs error of the layer's `out` or the model's `logits`), `MISMATCH`, `ERROR` or `-` (unsupported, with the reason listed below the table).
Exit status 1 if any cell mismatched or errored.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from moe_ir.backends import default_backend_labels, resolve_backends
from moe_ir.frontends import load_any
from moe_ir.model_spec import ModelSpec, miniature_model
from moe_ir.spec import miniature
from moe_ir.validate import validate, validate_model

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specs", nargs="+", type=Path, default=sorted((REPO / "specs").glob("*.yaml")) + sorted((REPO / "specs" / "models").glob("*.yaml")))
    p.add_argument("--backends", nargs="+", default=[b for b in default_backend_labels() if b != "reference"],
                   help="backend labels (default: every registered backend but the reference, each default variant)")
    p.add_argument("--hidden", type=int, default=64, help="miniature hidden size (default 64)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    rows, reasons, failed = [], {}, False
    for path in args.specs:
        spec = load_any(path)
        is_model = isinstance(spec, ModelSpec)
        spec = miniature_model(spec, args.hidden) if is_model else miniature(spec, args.hidden)
        start = time.perf_counter()
        report = (validate_model if is_model else validate)(spec, resolve_backends(args.backends), tokens=args.tokens, seed=args.seed)
        print(f"{path.stem}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        cells = {}
        for r in report.results:
            if r.status == "ok":
                err = r.outputs.get(report.primary)
                cells[r.backend] = f"ok {err.max_abs:.0e}" if err is not None else "ok"
            elif r.status == "skipped":
                cells[r.backend] = "-"
                reasons.setdefault(r.reason, set()).add(f"{path.stem}/{r.backend}")
            else:
                cells[r.backend] = r.status.upper()
                reasons.setdefault(r.reason, set()).add(f"{path.stem}/{r.backend}")
                failed = True
        rows.append((f"models/{path.stem}" if is_model else path.stem, cells))

    if args.json:
        print(json.dumps({"rows": {name: cells for name, cells in rows},
                          "reasons": {k: sorted(v) for k, v in reasons.items()}}, indent=2))
        return 1 if failed else 0
    width = max(len(n) for n, _ in rows)
    header = "spec".ljust(width) + "  " + "  ".join(b.ljust(13) for b in args.backends)
    print(header)
    print("-" * len(header))
    for name, cells in rows:
        print(name.ljust(width) + "  " + "  ".join(cells.get(b, "?").ljust(13) for b in args.backends))
    if reasons:
        print("\nnot run / failed:")
        for reason, where in reasons.items():
            print(f"  {reason}\n      ({', '.join(sorted(where))})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
