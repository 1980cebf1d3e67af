"""Graph passes and the pass manager. Importing this package registers every pass."""
from . import dce, fusions, quantize  # noqa: F401  (registration)
from .fusions import unfused_moe_reason
from .manager import PASSES, Pass, get_pass, register_pass, run_pipeline

# Named pipelines backends and the CLI refer to.
PIPELINES: dict[str, tuple[str, ...]] = {
    "none": (),
    "inference": ("strip-training-outputs", "dce"),
    "optimize": ("strip-training-outputs", "fuse-shared-experts", "fuse-gate-up", "dce"),
    "fused": ("strip-training-outputs", "fuse-shared-experts", "fuse-moe", "dce"),
}

__all__ = ["PASSES", "PIPELINES", "Pass", "get_pass", "register_pass", "run_pipeline", "unfused_moe_reason"]
