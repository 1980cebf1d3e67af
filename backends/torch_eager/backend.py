"""The `torch` backend: the eager module in-process, and a standalone model.py bundle as the artifact."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml

from ...builder import spec_hash
from ...ir import Graph
from ...params import save_weights
from ...spec import LayerSpec, spec_to_dict
from ..base import Backend, BuildResult, Runner
from .codegen import generate_source
from .module import MoELayer, unsupported_ops

# Outputs a runner passes on: the layer output and the routing record validation compares.
RUNNER_OUTPUTS = ("out", "expert_idx", "weights", "rows")


def make_runner(module: torch.nn.Module) -> Runner:
    module.eval()

    def run(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            res = module(x)
        found = {"out": res.out, **res.routing}
        return {key: found[key] for key in RUNNER_OUTPUTS if key in found}

    return run


class TorchBackend(Backend):
    name = "torch"
    summary = "eager PyTorch module (trainable, every routing and balance policy); builds a standalone model.py"
    pipeline = ("dce",)

    def supports(self, graph: Graph) -> tuple[bool, str]:
        missing = unsupported_ops(graph)
        if missing:
            return False, f"no eager implementation of op(s) {', '.join(missing)}"
        return True, ""

    def prepare(self, graph: Graph, weights: Mapping[str, torch.Tensor], **options: Any) -> Runner:
        return make_runner(MoELayer(graph, weights, **options))

    def build(self, spec: LayerSpec, graph: Graph, weights: Mapping[str, torch.Tensor], out_dir: Path,
              **options: Any) -> BuildResult:
        """Write OUT/model.py, OUT/weights.safetensors and OUT/spec.yaml, all or nothing.

        The bundle is assembled in a sibling temp folder and each file is moved into place only once all
        three exist, so a failure leaves no half-written file in OUT."""
        # The module checks names and shapes (one WeightsError listing every mismatch) before anything is written.
        module = MoELayer(graph, weights)
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        names = ("model.py", "weights.safetensors", "spec.yaml")
        try:
            (staging / "model.py").write_text(generate_source(spec))
            save_weights(module.canonical_weights(), staging / "weights.safetensors",
                         {"spec_hash": spec_hash(spec), "format": "moe-ir canonical"})
            (staging / "spec.yaml").write_text(yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(staging / name, out_dir / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return BuildResult(files=[out_dir / name for name in names],
                           notes=[f"standalone PyTorch module: {out_dir / 'model.py'} (depends on torch only)"])
