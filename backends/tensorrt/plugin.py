"""The TensorRT plugin `moe_ir::FusedMoE`, written with TensorRT's Python plugin API (`tensorrt.plugin`).

The bundled copy of this file is standalone (torch, optionally triton and numpy; tensorrt only inside
`register_plugin`): `moe-ir build --backend tensorrt` writes it into the output bundle with the one line that
imports the shared torch kernels replaced by their source, copied verbatim (`bundle_source`), so a machine
with TensorRT can build and run the engine from the bundle alone. `moe_ir` is used there when it is
installed (the Triton MoE kernels of `moe_ir.backends.triton`), never required.

The op contract (inputs, outputs, attribute codes) is `moe_ir/backends/onnx/plugin_op.py`; the tables here
repeat it because this file must run without moe_ir, and a test pins both to the same values.

  inputs   x [T,H] (fp32|fp16|bf16), w_router [E,H] fp32, bias [E] fp32, w_gate_up [E,2F,H] (gated) or
           w_up [E,F,H] (non-gated) in x's dtype, w_down [E,H,F] in x's dtype
  outputs  out [T,H] x's dtype, expert_idx [T,k] int32, weights [T,k] fp32
  attrs    score_fn, top_k, n_group, topk_group, group_score, normalize, activation (ints), scale (float)

Weights enter as tensor inputs (ONNX initializers), not plugin fields: TensorRT keeps initializers as typed,
refittable engine weights, while plugin fields would be copied into every serialised plugin blob.

Quantized routed experts: a second plugin `moe_ir::QFusedMoE` (TensorRT's Python plugins have one fixed input
signature each), the same outputs and attributes plus quant_format (0 int8, 1 int4), bits, block, symmetric:
  inputs   x, w_router, bias as above; w_gate_up_codes [E,(2|1)F,H*bits/8] int8 (the stored bytes: int4 two a
           byte, the even column low; uint8 codes reinterpreted), w_gate_up_scales [E,(2|1)F,H/block] fp32,
           w_gate_up_zeros [E,(2|1)F,H/block] int8 (uint8 zero points' bytes) or [1] (symmetric: the implicit
           zero point, int4 8, int8 0); w_down_codes / w_down_scales / w_down_zeros likewise for [E,H,F]
Weight = (code - zero) * scale per block of `block` input columns. Its @impl (JIT) dequantizes one expert at a
time (`fused_moe_quantized_torch`); its @aot_impl is `fused_moe_quantized_token_kernel`, the one-kernel Triton
implementation with each weight tile dequantized where it is loaded. It needs TensorRT >= 10.6 (the IPluginV3
fallback takes float experts only).

Three implementations, one semantics:
  * `fused_moe_torch`: the shared torch kernels (routing, dispatch, grouped FFN, combine of
    `moe_ir.backends.torch_kernels`), any device. What `@impl` runs where no Triton kernel applies, and
    what the tests compare with the moe_ir reference on CPU.
  * `compute_fused_moe`: what `@impl` calls: moe_ir's Triton MoE kernels on CUDA when moe_ir is importable,
    otherwise `fused_moe_torch`.
  * `fused_moe_token_kernel`: one Triton kernel for the whole op, one program per (token, hidden tile).
    `@aot_impl` (TensorRT >= 10.9) compiles it to PTX; the engine then needs no Python at run time.
    Expert weights are re-read per token, so it suits decode-sized batches; it exists because an AOT
    plugin is one kernel launch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

# The op's torch semantics are the kernel set every torch backend runs. The bundled copy has this line
# replaced by those functions' source (and the ones they call), so it does not need moe_ir.
from moe_ir.backends.torch_kernels import combine, dispatch, grouped_ffn, grouped_ffn_packed, route_topk, scale_weights, score, split_gate_up  # noqa: E501  (bundle: inline)

PLUGIN_NAMESPACE = "moe_ir"
PLUGIN_OP = "FusedMoE"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_OP}"
PLUGIN_VERSION = "1"
INPUT_NAMES = ("x", "w_router", "bias", "w_gate_up", "w_down")
OUTPUT_NAMES = ("out", "expert_idx", "weights")
ATTRIBUTE_NAMES = ("score_fn", "top_k", "n_group", "topk_group", "group_score", "normalize", "scale", "activation")

QUANT_PLUGIN_OP = "QFusedMoE"
QUANT_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{QUANT_PLUGIN_OP}"
QUANT_INPUT_NAMES = ("x", "w_router", "bias", "w_gate_up_codes", "w_gate_up_scales", "w_gate_up_zeros",
                     "w_down_codes", "w_down_scales", "w_down_zeros")
QUANT_ATTRIBUTE_NAMES = ("quant_format", "bits", "block", "symmetric")
PLUGIN_OPS = (PLUGIN_OP, QUANT_PLUGIN_OP)

# Attribute codes: the position in the tuple is the code (same values as plugin_op.py's tables).
SCORE_FNS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu")
GATED_ACTIVATIONS = frozenset({"swiglu", "geglu"})
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
QUANT_FORMATS = ("int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
QUANT_BLOCKS = (16, 32, 64, 128, 256)

# First TensorRT versions with the features used here.
PYTHON_PLUGINS_SINCE = (10, 6)   # tensorrt.plugin: register / impl
AOT_PLUGINS_SINCE = (10, 9)      # tensorrt.plugin.aot_impl, the ONNX parser's `aot` attribute
PLUGIN_V3_SINCE = (10, 0)        # IPluginV3 (C++ and Python bindings, plugin_v3.py) first shipped in TensorRT 10.0
NOT_INSTALLED = "TensorRT is not installed on this machine (pip install tensorrt on a machine with an NVIDIA GPU)"


class PluginError(ValueError):
    """A bad attribute or input of the plugin (one line: which attribute or input, what was expected)."""


def parse_version(text: str) -> tuple[int, ...]:
    """'10.9.0.34' -> (10, 9, 0, 34); '11.0.0b1' -> (11, 0, 0). Compared as tuples, never as strings."""
    parts = []
    for piece in text.strip().split("."):
        match = re.match(r"\d+", piece)
        if match is None:
            break
        parts.append(int(match.group()))
    if not parts:
        raise PluginError(f"cannot read a version number from {text!r}")
    return tuple(parts)


def implementation_for(version: tuple[int, ...] | None, prefer_aot: bool = True, quantized: bool = False) -> str:
    """Which plugin implementation a TensorRT version gets: 'aot', 'python' (JIT @impl) or 'v3'. QFusedMoE
    (`quantized`) has the JIT @impl only."""
    if version is None:
        raise PluginError("TensorRT is not installed")
    if quantized:
        if version >= AOT_PLUGINS_SINCE and prefer_aot:
            return "aot"
        if version >= PYTHON_PLUGINS_SINCE:
            return "python"
        raise PluginError(f"TensorRT {'.'.join(map(str, version))}: {QUANT_PLUGIN_ID} (quantized experts) is a "
                          f"Python plugin (TensorRT >= {'.'.join(map(str, PYTHON_PLUGINS_SINCE))}); the IPluginV3 "
                          f"fallback takes float experts only")
    if version >= AOT_PLUGINS_SINCE and prefer_aot:
        return "aot"
    if version >= PYTHON_PLUGINS_SINCE:
        return "python"
    if version >= PLUGIN_V3_SINCE:
        return "v3"
    raise PluginError(f"TensorRT {'.'.join(map(str, version))} is too old: the MoE plugin needs IPluginV3 "
                      f"(TensorRT >= {'.'.join(map(str, PLUGIN_V3_SINCE))})")


# ------------------------------------------------------------------------------------------------
# attributes


@dataclass(frozen=True)
class MoEConfig:
    """The decoded attributes of one FusedMoE node."""

    score_fn: str
    top_k: int
    n_group: int
    topk_group: int
    group_score: str
    normalize: bool
    scale: float
    activation: str

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    def to_fields(self) -> dict[str, int | float]:
        """ONNX attributes / TensorRT plugin fields (ints and one float)."""
        return {"score_fn": SCORE_FNS.index(self.score_fn), "top_k": self.top_k, "n_group": self.n_group,
                "topk_group": self.topk_group, "group_score": GROUP_SCORES.index(self.group_score),
                "normalize": int(self.normalize), "scale": float(self.scale),
                "activation": ACTIVATIONS.index(self.activation)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "MoEConfig":
        """Inverse of to_fields. Values may be plain numbers or 1-element arrays (plugin field data)."""
        def scalar(key: str) -> Any:
            if key not in fields:
                raise PluginError(f"{PLUGIN_ID}: missing attribute '{key}'")
            value = fields[key]
            if hasattr(value, "reshape"):  # numpy array from a PluginField
                flat = value.reshape(-1)
                if flat.shape[0] != 1:
                    raise PluginError(f"{PLUGIN_ID}: attribute '{key}' must hold one value, got {flat.shape[0]}")
                value = flat[0].item()
            return value

        def integer(key: str) -> int:
            value = scalar(key)
            if isinstance(value, float) and not value.is_integer():
                raise PluginError(f"{PLUGIN_ID}: attribute '{key}' must be an integer, got {value}")
            return int(value)

        def code(key: str, table: Sequence[str]) -> str:
            value = integer(key)
            if not 0 <= value < len(table):
                raise PluginError(f"{PLUGIN_ID}: attribute {key}={value} is not one of "
                                  f"{', '.join(f'{i} ({n})' for i, n in enumerate(table))}")
            return table[value]

        normalize = integer("normalize")
        if normalize not in (0, 1):
            raise PluginError(f"{PLUGIN_ID}: attribute normalize={normalize} must be 0 or 1")
        cfg = cls(score_fn=code("score_fn", SCORE_FNS), top_k=integer("top_k"), n_group=integer("n_group"),
                  topk_group=integer("topk_group"), group_score=code("group_score", GROUP_SCORES),
                  normalize=bool(normalize), scale=float(scalar("scale")), activation=code("activation", ACTIVATIONS))
        if cfg.top_k < 1:
            raise PluginError(f"{PLUGIN_ID}: attribute top_k={cfg.top_k} must be >= 1")
        if cfg.n_group < 1 or not 1 <= cfg.topk_group <= cfg.n_group:
            raise PluginError(f"{PLUGIN_ID}: attributes n_group={cfg.n_group}, topk_group={cfg.topk_group} "
                              f"need 1 <= topk_group <= n_group")
        if not math.isfinite(cfg.scale):
            raise PluginError(f"{PLUGIN_ID}: attribute scale={cfg.scale} must be finite")
        return cfg


def _scalar_field(fields: Mapping[str, Any], key: str, plugin: str) -> Any:
    if key not in fields:
        raise PluginError(f"{plugin}: missing attribute '{key}'")
    value = fields[key]
    if hasattr(value, "reshape"):  # numpy array from a PluginField
        flat = value.reshape(-1)
        if flat.shape[0] != 1:
            raise PluginError(f"{plugin}: attribute '{key}' must hold one value, got {flat.shape[0]}")
        value = flat[0].item()
    if isinstance(value, float) and not value.is_integer():
        raise PluginError(f"{plugin}: attribute '{key}' must be an integer, got {value}")
    return int(value)


@dataclass(frozen=True)
class QuantConfig:
    """The quantization attributes of one QFusedMoE node: format ('int8'|'int4'), block, symmetric."""

    format: str
    block: int
    symmetric: bool

    @property
    def bits(self) -> int:
        return QUANT_BITS[self.format]

    def to_fields(self) -> dict[str, int]:
        return {"quant_format": QUANT_FORMATS.index(self.format), "bits": self.bits, "block": self.block,
                "symmetric": int(self.symmetric)}

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> "QuantConfig":
        """Inverse of to_fields (plain numbers or 1-element arrays); a bad value is a PluginError naming it."""
        code, bits, block, symmetric = (_scalar_field(fields, k, QUANT_PLUGIN_ID) for k in QUANT_ATTRIBUTE_NAMES)
        if not 0 <= code < len(QUANT_FORMATS):
            raise PluginError(f"{QUANT_PLUGIN_ID}: attribute quant_format={code} is not one of "
                              f"{', '.join(f'{i} ({n})' for i, n in enumerate(QUANT_FORMATS))}")
        fmt = QUANT_FORMATS[code]
        if bits != QUANT_BITS[fmt]:
            raise PluginError(f"{QUANT_PLUGIN_ID}: attribute bits={bits} does not match quant_format {fmt} "
                              f"({QUANT_BITS[fmt]} bits)")
        if block not in QUANT_BLOCKS:
            raise PluginError(f"{QUANT_PLUGIN_ID}: attribute block={block} is not one of "
                              f"{', '.join(map(str, QUANT_BLOCKS))}")
        if symmetric not in (0, 1):
            raise PluginError(f"{QUANT_PLUGIN_ID}: attribute symmetric={symmetric} must be 0 or 1")
        return cls(fmt, block, bool(symmetric))


def plugin_fields(cfg: MoEConfig, quant: QuantConfig | None = None) -> list[tuple[str, Any, str]]:
    """The plugin fields of a node, as TensorRT gets them: (name, 1-element numpy array, PluginFieldType name),
    `scale` FLOAT32 and every other attribute INT32 (the ONNX parser's conversion of int/float attributes, and
    what the IPluginV3 class serialises)."""
    import numpy as np

    values = {**cfg.to_fields(), **(quant.to_fields() if quant is not None else {})}
    return [(key, np.array([value], dtype=np.float32 if key == "scale" else np.int32),
             "FLOAT32" if key == "scale" else "INT32") for key, value in values.items()]


# ------------------------------------------------------------------------------------------------
# shape and type logic (plain functions: the @register function and the IPluginV3 class both use them)


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


def check_shapes(x: Sequence[Any], w_router: Sequence[Any], bias: Sequence[Any], w_gate_up: Sequence[Any],
                 w_down: Sequence[Any], cfg: MoEConfig) -> tuple[int | None, int | None, int | None]:
    """Check the input ranks and every relation between static dims; return (E, H, F) where static.
    Dims may be ints or symbolic objects (TensorRT shape expressions, strings): only ints are compared."""
    for name, shape, rank in (("x", x, 2), ("w_router", w_router, 2), ("bias", bias, 1), ("w_gate_up", w_gate_up, 3),
                              ("w_down", w_down, 3)):
        if len(shape) != rank:
            raise PluginError(f"{PLUGIN_ID}: input {name} must have rank {rank}, got shape {tuple(shape)}")
    e, h = _static(w_router[0]), _static(w_router[1])
    f = _static(w_down[2])
    rows = _static(w_gate_up[1])

    def same(a: Any, b: Any, what: str) -> None:
        if _static(a) is not None and _static(b) is not None and a != b:
            raise PluginError(f"{PLUGIN_ID}: {what}: {a} != {b} (x {tuple(x)}, w_router {tuple(w_router)}, "
                              f"bias {tuple(bias)}, w_gate_up {tuple(w_gate_up)}, w_down {tuple(w_down)})")

    same(x[1], w_router[1], "hidden size of x vs w_router")
    same(bias[0], w_router[0], "bias length vs experts")
    same(w_gate_up[0], w_router[0], "experts of w_gate_up vs w_router")
    same(w_down[0], w_router[0], "experts of w_down vs w_router")
    same(w_gate_up[2], w_router[1], "hidden size of w_gate_up")
    same(w_down[1], w_router[1], "hidden size of w_down")
    if rows is not None and f is not None:
        same(rows, (2 if cfg.gated else 1) * f, f"rows of w_gate_up for {cfg.activation} (F={f})")
    if e is not None:
        if e % cfg.n_group:
            raise PluginError(f"{PLUGIN_ID}: n_group={cfg.n_group} must divide the {e} experts")
        selectable = cfg.topk_group * (e // cfg.n_group) if cfg.n_group > 1 else e
        if cfg.top_k > selectable:
            raise PluginError(f"{PLUGIN_ID}: top_k={cfg.top_k} exceeds the {selectable} experts selectable")
        if cfg.n_group > 1 and cfg.group_score == "top2_sum" and e // cfg.n_group < 2:
            raise PluginError(f"{PLUGIN_ID}: top2_sum group scores need >= 2 experts per group")
    return e, h, f


def output_shapes(x: Sequence[Any], cfg: MoEConfig) -> tuple[tuple, tuple, tuple]:
    """out [T,H], expert_idx [T,k], weights [T,k]; T (and H) may be symbolic."""
    t = x[0]
    return (t, x[1]), (t, cfg.top_k), (t, cfg.top_k)


def output_dtypes(x_dtype: str, w_router: str = "float32", bias: str = "float32", w_gate_up: str | None = None,
                  w_down: str | None = None) -> tuple[str, str, str]:
    """Output dtypes by name, after checking the input dtypes the contract allows."""
    if x_dtype not in ACTIVATION_DTYPES:
        raise PluginError(f"{PLUGIN_ID}: x must be one of {', '.join(ACTIVATION_DTYPES)}, got {x_dtype}")
    for name, dtype in (("w_router", w_router), ("bias", bias)):
        if dtype != "float32":
            raise PluginError(f"{PLUGIN_ID}: {name} must be float32, got {dtype}")
    for name, dtype in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        if dtype is not None and dtype != x_dtype:
            raise PluginError(f"{PLUGIN_ID}: {name} must have x's dtype {x_dtype}, got {dtype}")
    return x_dtype, "int32", "float32"


def check_quantized_shapes(x: Sequence[Any], w_router: Sequence[Any], bias: Sequence[Any],
                           gate_up: Sequence[Sequence[Any]], down: Sequence[Sequence[Any]], cfg: MoEConfig,
                           quant: QuantConfig) -> tuple[int | None, int | None, int | None]:
    """QFusedMoE's shape logic: `gate_up` and `down` are the (codes, scales, zeros) shapes of each weight. Checks
    ranks and every relation between static dims (symbolic dims are skipped), returns (E, H, F) where static."""
    for name, shape, rank in (("x", x, 2), ("w_router", w_router, 2), ("bias", bias, 1)):
        if len(shape) != rank:
            raise PluginError(f"{QUANT_PLUGIN_ID}: input {name} must have rank {rank}, got shape {tuple(shape)}")
    names = QUANT_INPUT_NAMES[3:]
    for name, shape in zip(names, (*gate_up, *down)):
        rank = 1 if name.endswith("zeros") and quant.symmetric else 3
        if len(shape) != rank:
            raise PluginError(f"{QUANT_PLUGIN_ID}: input {name} must have rank {rank}, got shape {tuple(shape)}")
    e, h = _static(w_router[0]), _static(w_router[1])
    down_bytes = _static(down[0][2])
    f = down_bytes * 8 // quant.bits if down_bytes is not None else None
    for dim, what in ((h, "hidden size"), (f, "expert width")):
        if dim is not None and dim % quant.block:
            raise PluginError(f"{QUANT_PLUGIN_ID}: attribute block={quant.block} does not divide the {what} {dim}")
    rows = None if f is None else (2 if cfg.gated else 1) * f
    per_byte = 8 // quant.bits

    def div(a: int | None, b: int) -> int | None:
        return None if a is None else a // b

    want = {"x": (None, h), "bias": (e,)}
    for prefix, (r, c) in (("w_gate_up", (rows, h)), ("w_down", (h, f))):
        want[f"{prefix}_codes"] = (e, r, div(c, per_byte))
        want[f"{prefix}_scales"] = (e, r, div(c, quant.block))
        want[f"{prefix}_zeros"] = (1,) if quant.symmetric else (e, r, div(c, quant.block))
    given = {"x": x, "bias": bias, **dict(zip(names, (*gate_up, *down)))}
    for name, expected in want.items():
        for got, dim in zip(given[name], expected):
            if dim is not None and _static(got) is not None and got != dim:
                raise PluginError(f"{QUANT_PLUGIN_ID}: input {name} has shape {tuple(given[name])}, expected "
                                  f"{tuple('?' if d is None else d for d in expected)} (E={e}, H={h}, F={f}, "
                                  f"{quant.format} block {quant.block}"
                                  f"{'' if quant.symmetric else ' with zero points'})")
    if e is not None:
        check_shapes(x, w_router, bias, (e, rows if rows is not None else "R", h), (e, h, f if f is not None else "F"),
                     cfg)  # the routing attributes against the expert count
    return e, h, f


def quantized_output_dtypes(x_dtype: str, w_router: str, bias: str, parts: Sequence[str]) -> tuple[str, str, str]:
    """QFusedMoE's output dtypes after checking its inputs': x float32/float16/bfloat16, the router and bias
    float32, codes and zero points int8, scales float32 (`parts` in QUANT_INPUT_NAMES[3:] order)."""
    for name, dtype in zip(QUANT_INPUT_NAMES[3:], parts):
        want = "float32" if name.endswith("scales") else "int8"
        if dtype != want:
            raise PluginError(f"{QUANT_PLUGIN_ID}: {name} must be {want}, got {dtype}")
    return output_dtypes(x_dtype, w_router, bias)


# ------------------------------------------------------------------------------------------------
# torch implementation


def fused_moe_torch(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, w_gate_up: torch.Tensor,
                    w_down: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op in torch: (out [T,H] x.dtype, expert_idx [T,k] int32, weights [T,k] fp32).

    Routing in fp32; expert FFNs run in x's dtype (as the reference does); the combine accumulates in fp32."""
    scores = score(F.linear(x.float(), w_router.float()), cfg.score_fn)
    expert_idx, weights = route_topk(scores, bias.float(), cfg.top_k, cfg.n_group, cfg.topk_group, cfg.group_score)
    weights = scale_weights(weights, cfg.normalize, cfg.scale)
    rows, row_weights, group_sizes = dispatch(expert_idx, weights, w_down.shape[0])
    w_up, w_gate, _, _ = split_gate_up(w_gate_up, None, None, None, cfg.activation, "gate_up_fused")
    y = grouped_ffn(x, rows, group_sizes, w_up, w_down, w_gate, None, None, None, cfg.activation)
    out = combine(y.float(), rows, row_weights, x.shape[0])
    return out.to(x.dtype), expert_idx.to(torch.int32), weights.float()


def packed_parts(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, quant: QuantConfig,
                 rows: slice = slice(None)) -> tuple:
    """A stacked quantized weight's rows as the shared kernels' packed weight (qweight, scales, zeros, format,
    block, None, None): the stored bytes viewed in their IR types (uint8 unless symmetric int8), nothing copied."""
    signed = quant.format == "int8" and quant.symmetric
    qweight = (codes if signed else codes.view(torch.uint8))[:, rows]
    zero_points = None if quant.symmetric else zeros.view(torch.uint8)[:, rows]
    return (qweight, scales[:, rows], zero_points, quant.format, quant.block, None, None)


def fused_moe_quantized_torch(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, gate_up_codes: torch.Tensor,
                              gate_up_scales: torch.Tensor, gate_up_zeros: torch.Tensor, down_codes: torch.Tensor,
                              down_scales: torch.Tensor, down_zeros: torch.Tensor, cfg: MoEConfig,
                              quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QFusedMoE in torch: routing as `fused_moe_torch`, then each expert with rows dequantizes its own
    matrices (the shared kernels' `grouped_ffn_packed`): at most one expert's float weights exist at a time.
    The dequantized weight is (code - zero) * scale in float32, then x's dtype."""
    check_quantized_shapes(tuple(x.shape), tuple(w_router.shape), tuple(bias.shape),
                           [tuple(t.shape) for t in (gate_up_codes, gate_up_scales, gate_up_zeros)],
                           [tuple(t.shape) for t in (down_codes, down_scales, down_zeros)], cfg, quant)
    scores = score(F.linear(x.float(), w_router.float()), cfg.score_fn)
    expert_idx, weights = route_topk(scores, bias.float(), cfg.top_k, cfg.n_group, cfg.topk_group, cfg.group_score)
    weights = scale_weights(weights, cfg.normalize, cfg.scale)
    rows, row_weights, group_sizes = dispatch(expert_idx, weights, down_codes.shape[0])
    width = down_codes.shape[2] * 8 // quant.bits
    parts = (gate_up_codes, gate_up_scales, gate_up_zeros)
    if cfg.gated:  # gate rows, then up rows
        w_gate, w_up = packed_parts(*parts, quant, slice(0, width)), packed_parts(*parts, quant, slice(width, None))
    else:
        w_gate, w_up = None, packed_parts(*parts, quant)
    w_down = packed_parts(down_codes, down_scales, down_zeros, quant)
    y = grouped_ffn_packed(x, rows, group_sizes, w_up, w_down, w_gate, None, None, None, cfg.activation)
    out = combine(y.float(), rows, row_weights, x.shape[0])
    return out.to(x.dtype), expert_idx.to(torch.int32), weights.float()


def compute_fused_moe(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, w_gate_up: torch.Tensor,
                      w_down: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `@impl` runs: moe_ir's Triton MoE kernels for CUDA tensors when moe_ir is importable, else torch."""
    if x.is_cuda:
        try:
            from moe_ir.backends.triton import moe_forward
        except ImportError:
            moe_forward = None
        if moe_forward is not None:
            up, gate, _, _ = split_gate_up(w_gate_up, None, None, None, cfg.activation, "gate_up_fused")
            logits = F.linear(x.float(), w_router.float())
            out, weights, expert_idx = moe_forward(
                x, logits, bias.float(), gate, up, w_down, activation=cfg.activation, score=cfg.score_fn,
                k=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group, group_score=cfg.group_score,
                normalize=cfg.normalize, scale=cfg.scale)
            return out, expert_idx.to(torch.int32), weights
    return fused_moe_torch(x, w_router, bias, w_gate_up, w_down, cfg)


# ------------------------------------------------------------------------------------------------
# one-kernel Triton implementation (the AOT plugin's kernel)

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch implementation still works; @aot_impl is then not registered
    triton = None

if triton is not None:
    @triton.jit
    def route_token(x_ptr, w_router_ptr, bias_ptr, token, E: tl.constexpr, H: tl.constexpr, K: tl.constexpr,
                    SCORE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
                    NORMALIZE: tl.constexpr, SCALE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
        """Token `token`'s routing: (chosen experts int32 [BLOCK_K], their weights fp32 [BLOCK_K]), slots >= K 0."""
        e_offs = tl.arange(0, BLOCK_E)
        e_valid = e_offs < E
        neg_inf = float("-inf")

        logits = tl.zeros([BLOCK_E], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            h_offs = h0 + tl.arange(0, BLOCK_H)
            h_valid = h_offs < H
            xv = tl.load(x_ptr + token * H + h_offs, mask=h_valid, other=0.0).to(tl.float32)
            wr = tl.load(w_router_ptr + e_offs[:, None] * H + h_offs[None, :],
                         mask=e_valid[:, None] & h_valid[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(wr * xv[None, :], axis=1)

        if SCORE == 0:
            shifted = tl.where(e_valid, logits, neg_inf)
            p = tl.exp(shifted - tl.max(shifted, axis=0))
            p = tl.where(e_valid, p, 0.0)
            scores = p / tl.sum(p, axis=0)
        else:
            scores = 1.0 / (1.0 + tl.exp(-logits))
        bias = tl.load(bias_ptr + e_offs, mask=e_valid, other=0.0).to(tl.float32)
        select = tl.where(e_valid, scores + bias, neg_inf)

        if N_GROUP > 1:
            group_size: tl.constexpr = E // N_GROUP
            group_of = e_offs // group_size
            g_offs = tl.arange(0, BLOCK_G)
            group_value = tl.full([BLOCK_G], neg_inf, dtype=tl.float32)
            for g in tl.static_range(N_GROUP):
                member = e_valid & (group_of == g)
                best = tl.max(tl.where(member, select, neg_inf), axis=0)
                if GROUP_SCORE == 1:
                    first = tl.min(tl.where(member & (select == best), e_offs, BLOCK_E), axis=0)
                    second = tl.max(tl.where(member & (e_offs != first), select, neg_inf), axis=0)
                    best = best + second
                group_value = tl.where(g_offs == g, best, group_value)
            kept = tl.zeros([BLOCK_G], dtype=tl.int32)
            for _ in tl.static_range(TOPK_GROUP):
                open_value = tl.where((kept == 0) & (g_offs < N_GROUP), group_value, neg_inf)
                best = tl.max(open_value, axis=0)
                pick = tl.min(tl.where(open_value == best, g_offs, BLOCK_G), axis=0)
                kept = tl.where(g_offs == pick, 1, kept)
            expert_kept = tl.zeros([BLOCK_E], dtype=tl.int32)
            for g in tl.static_range(N_GROUP):
                expert_kept = tl.where(group_of == g, tl.sum(tl.where(g_offs == g, kept, 0), axis=0), expert_kept)
            select = tl.where(expert_kept > 0, select, neg_inf)

        k_offs = tl.arange(0, BLOCK_K)
        chosen = tl.zeros([BLOCK_K], dtype=tl.int32)
        gate_w = tl.zeros([BLOCK_K], dtype=tl.float32)
        for slot in tl.static_range(K):
            best = tl.max(select, axis=0)
            pick = tl.min(tl.where(select == best, e_offs, BLOCK_E), axis=0)
            chosen = tl.where(k_offs == slot, pick, chosen)
            gate_w = tl.where(k_offs == slot, tl.sum(tl.where(e_offs == pick, scores, 0.0), axis=0), gate_w)
            select = tl.where(e_offs == pick, neg_inf, select)
        if NORMALIZE:
            gate_w = gate_w / (tl.sum(gate_w, axis=0) + 1e-20)
        gate_w = gate_w * SCALE
        return chosen, gate_w

    @triton.jit
    def weight_tile(w_ptr, scales_ptr, zeros_ptr, expert, ROWS: tl.constexpr, COLS: tl.constexpr, r_offs, c_offs,
                    mask, QUANT: tl.constexpr, INT4: tl.constexpr, SYMMETRIC: tl.constexpr, QBLOCK: tl.constexpr):
        """Expert `expert`'s [r_offs, c_offs] tile of a stacked [E, ROWS, COLS] weight, in float32: loaded (QUANT
        0), or dequantized from the QFusedMoE parts, (code - zero) * scale per block of QBLOCK columns (the
        reference's value: code - zero is exact, one rounding in the product). Codes and zero points come as
        int8 bytes: int4 two a byte (the even column low), uint8 values read back as byte & 0xFF."""
        if QUANT == 0:
            w = tl.load(w_ptr + expert * ROWS * COLS + r_offs[:, None] * COLS + c_offs[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        else:
            if INT4:
                byte = tl.load(w_ptr + expert * ROWS * (COLS // 2) + r_offs[:, None] * (COLS // 2)
                               + (c_offs // 2)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
                code = (byte >> ((c_offs % 2) * 4)[None, :]) & 0xF
            else:
                code = tl.load(w_ptr + expert * ROWS * COLS + r_offs[:, None] * COLS + c_offs[None, :], mask=mask,
                               other=0).to(tl.int32)
                if not SYMMETRIC:
                    code = code & 0xFF  # uint8 codes
            blocks: tl.constexpr = COLS // QBLOCK
            block_at = expert * ROWS * blocks + r_offs[:, None] * blocks + (c_offs // QBLOCK)[None, :]
            scale = tl.load(scales_ptr + block_at, mask=mask, other=0.0)
            if SYMMETRIC:
                zero = 8 if INT4 else 0  # the format's implicit zero point
            else:
                zero = tl.load(zeros_ptr + block_at, mask=mask, other=0).to(tl.int32) & 0xFF
            w = (code - zero).to(tl.float32) * scale
        return w

    @triton.jit
    def expert_outputs(x_ptr, w_gate_up_ptr, gu_scales_ptr, gu_zeros_ptr, w_down_ptr, d_scales_ptr, d_zeros_ptr,
                       token, o_offs, chosen, gate_w, H: tl.constexpr, FFN: tl.constexpr, K: tl.constexpr,
                       ACT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_OUT: tl.constexpr, QUANT: tl.constexpr, INT4: tl.constexpr, SYMMETRIC: tl.constexpr,
                       QBLOCK: tl.constexpr):
        """out[token, o_offs]: the chosen experts' FFN outputs, weighted and summed, in float32."""
        o_valid = o_offs < H
        k_offs = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        gated: tl.constexpr = ACT <= 1
        rows: tl.constexpr = 2 * FFN if gated else FFN
        for slot in range(K):
            expert = tl.sum(tl.where(k_offs == slot, chosen, 0), axis=0).to(tl.int64)
            weight = tl.sum(tl.where(k_offs == slot, gate_w, 0.0), axis=0)
            for f0 in range(0, FFN, BLOCK_F):
                f_offs = f0 + tl.arange(0, BLOCK_F)
                f_valid = f_offs < FFN
                up = tl.zeros([BLOCK_F], dtype=tl.float32)
                gate = tl.zeros([BLOCK_F], dtype=tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    h_offs = h0 + tl.arange(0, BLOCK_H)
                    h_valid = h_offs < H
                    tile_mask = f_valid[:, None] & h_valid[None, :]
                    xv = tl.load(x_ptr + token * H + h_offs, mask=h_valid, other=0.0).to(tl.float32)
                    if gated:
                        wu = weight_tile(w_gate_up_ptr, gu_scales_ptr, gu_zeros_ptr, expert, rows, H, f_offs + FFN,
                                         h_offs, tile_mask, QUANT, INT4, SYMMETRIC, QBLOCK)
                        wg = weight_tile(w_gate_up_ptr, gu_scales_ptr, gu_zeros_ptr, expert, rows, H, f_offs, h_offs,
                                         tile_mask, QUANT, INT4, SYMMETRIC, QBLOCK)
                        gate += tl.sum(wg * xv[None, :], axis=1)
                    else:
                        wu = weight_tile(w_gate_up_ptr, gu_scales_ptr, gu_zeros_ptr, expert, rows, H, f_offs, h_offs,
                                         tile_mask, QUANT, INT4, SYMMETRIC, QBLOCK)
                    up += tl.sum(wu * xv[None, :], axis=1)
                if ACT == 0:
                    hidden = gate / (1.0 + tl.exp(-gate)) * up
                elif ACT == 1:
                    hidden = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)) * up
                elif ACT == 2:
                    hidden = 0.5 * up * (1.0 + tl.math.erf(up * 0.7071067811865476))
                else:
                    hidden = tl.maximum(up, 0.0)
                hidden = tl.where(f_valid, hidden, 0.0)
                wd = weight_tile(w_down_ptr, d_scales_ptr, d_zeros_ptr, expert, H, FFN, o_offs, f_offs,
                                 o_valid[:, None] & f_valid[None, :], QUANT, INT4, SYMMETRIC, QBLOCK)
                acc += weight * tl.sum(wd * hidden[None, :], axis=1)
        return acc

    @triton.jit
    def token_program(x_ptr, w_router_ptr, bias_ptr, gu_ptr, gu_scales_ptr, gu_zeros_ptr, d_ptr, d_scales_ptr,
                      d_zeros_ptr, out_ptr, expert_idx_ptr, weights_ptr,
                      E: tl.constexpr, H: tl.constexpr, FFN: tl.constexpr, K: tl.constexpr,
                      SCORE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
                      NORMALIZE: tl.constexpr, SCALE: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_OUT: tl.constexpr,
                      QUANT: tl.constexpr, INT4: tl.constexpr, SYMMETRIC: tl.constexpr, QBLOCK: tl.constexpr):
        # Program (t, j) routes token t (cheap: E*H) and writes out[t, j*BLOCK_OUT : (j+1)*BLOCK_OUT]; program
        # (t, 0) also writes the routing record. Both kernels below are this body on their own inputs.
        token = tl.program_id(0).to(tl.int64)
        out_tile = tl.program_id(1)
        chosen, gate_w = route_token(x_ptr, w_router_ptr, bias_ptr, token, E, H, K, SCORE, N_GROUP, TOPK_GROUP,
                                     GROUP_SCORE, NORMALIZE, SCALE, BLOCK_E, BLOCK_G, BLOCK_K, BLOCK_H)
        k_offs = tl.arange(0, BLOCK_K)
        if out_tile == 0:
            k_valid = k_offs < K
            tl.store(expert_idx_ptr + token * K + k_offs, chosen, mask=k_valid)
            tl.store(weights_ptr + token * K + k_offs, gate_w, mask=k_valid)

        o_offs = out_tile * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        acc = expert_outputs(x_ptr, gu_ptr, gu_scales_ptr, gu_zeros_ptr, d_ptr, d_scales_ptr, d_zeros_ptr,
                             token, o_offs, chosen, gate_w, H, FFN, K, ACT, BLOCK_K, BLOCK_H, BLOCK_F, BLOCK_OUT,
                             QUANT, INT4, SYMMETRIC, QBLOCK)
        tl.store(out_ptr + token * H + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_offs < H)

    @triton.jit
    def fused_moe_token_kernel(
        x_ptr, w_router_ptr, bias_ptr, w_gate_up_ptr, w_down_ptr,  # inputs, in the plugin's order
        num_tokens,                                                 # the one scalar argument (SymInt32 in AOT)
        out_ptr, expert_idx_ptr, weights_ptr,                       # outputs, in the plugin's order
        E: tl.constexpr, H: tl.constexpr, FFN: tl.constexpr, K: tl.constexpr,
        SCORE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
        NORMALIZE: tl.constexpr, SCALE: tl.constexpr, ACT: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_OUT: tl.constexpr,
    ):
        # Shapes: x [T,H], w_router [E,H] fp32, bias [E] fp32, w_gate_up [E,(1|2)*FFN,H], w_down [E,H,FFN],
        # out [T,H], expert_idx [T,K] int32, weights [T,K] fp32. Float weights: no scales or zero points.
        token_program(x_ptr, w_router_ptr, bias_ptr, w_gate_up_ptr, w_gate_up_ptr, w_gate_up_ptr, w_down_ptr,
                      w_down_ptr, w_down_ptr, out_ptr, expert_idx_ptr, weights_ptr, E, H, FFN, K, SCORE, N_GROUP,
                      TOPK_GROUP, GROUP_SCORE, NORMALIZE, SCALE, ACT, BLOCK_E, BLOCK_G, BLOCK_K, BLOCK_H, BLOCK_F,
                      BLOCK_OUT, 0, 0, 1, 1)

    @triton.jit
    def fused_moe_quantized_token_kernel(
        x_ptr, w_router_ptr, bias_ptr, gu_codes_ptr, gu_scales_ptr, gu_zeros_ptr,  # inputs, in QFusedMoE's order
        d_codes_ptr, d_scales_ptr, d_zeros_ptr,
        num_tokens,
        out_ptr, expert_idx_ptr, weights_ptr,
        E: tl.constexpr, H: tl.constexpr, FFN: tl.constexpr, K: tl.constexpr,
        SCORE: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SCORE: tl.constexpr,
        NORMALIZE: tl.constexpr, SCALE: tl.constexpr, ACT: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_OUT: tl.constexpr,
        INT4: tl.constexpr, SYMMETRIC: tl.constexpr, QBLOCK: tl.constexpr,
    ):
        # fused_moe_token_kernel on QFusedMoE's inputs: each weight tile is dequantized where it is loaded (no
        # float copy of any expert), so the engine reads the stored bytes.
        token_program(x_ptr, w_router_ptr, bias_ptr, gu_codes_ptr, gu_scales_ptr, gu_zeros_ptr, d_codes_ptr,
                      d_scales_ptr, d_zeros_ptr, out_ptr, expert_idx_ptr, weights_ptr, E, H, FFN, K, SCORE, N_GROUP,
                      TOPK_GROUP, GROUP_SCORE, NORMALIZE, SCALE, ACT, BLOCK_E, BLOCK_G, BLOCK_K, BLOCK_H, BLOCK_F,
                      BLOCK_OUT, 1, INT4, SYMMETRIC, QBLOCK)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def kernel_constants(cfg: MoEConfig, experts: int, hidden: int, width: int) -> dict[str, Any]:
    """The kernel's compile-time constants: the weight shapes (static in an engine), the attributes (an AOT
    kernel takes no float arguments, so `scale` is baked in) and the tile sizes."""
    return {"E": experts, "H": hidden, "FFN": width, "K": cfg.top_k, "SCORE": SCORE_FNS.index(cfg.score_fn),
            "N_GROUP": cfg.n_group, "TOPK_GROUP": cfg.topk_group if cfg.n_group > 1 else 1,
            "GROUP_SCORE": GROUP_SCORES.index(cfg.group_score), "NORMALIZE": int(cfg.normalize),
            "SCALE": float(cfg.scale), "ACT": ACTIVATIONS.index(cfg.activation),
            "BLOCK_E": _pow2(experts), "BLOCK_G": _pow2(cfg.n_group), "BLOCK_K": _pow2(cfg.top_k),
            "BLOCK_H": min(_pow2(hidden), 64), "BLOCK_F": min(_pow2(width), 32), "BLOCK_OUT": min(_pow2(hidden), 128)}


def launch_fused_moe_kernel(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor, w_gate_up: torch.Tensor,
                            w_down: torch.Tensor, cfg: MoEConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `fused_moe_token_kernel` from Python (CUDA, or CPU under TRITON_INTERPRET=1): how it is tested."""
    if triton is None:
        raise PluginError("triton is not installed")
    experts, hidden = w_router.shape
    width = w_down.shape[2]
    const = kernel_constants(cfg, experts, hidden, width)
    tokens = x.shape[0]
    out = torch.empty_like(x)
    expert_idx = torch.empty(tokens, cfg.top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, cfg.top_k, dtype=torch.float32, device=x.device)
    if tokens:
        grid = (tokens, triton.cdiv(hidden, const["BLOCK_OUT"]))
        fused_moe_token_kernel[grid](x.contiguous(), w_router.float().contiguous(), bias.float().contiguous(),
                                     w_gate_up.contiguous(), w_down.contiguous(), tokens, out, expert_idx, weights,
                                     **const)
    return out, expert_idx, weights


def quantized_kernel_constants(cfg: MoEConfig, quant: QuantConfig, experts: int, hidden: int,
                               width: int) -> dict[str, Any]:
    """`kernel_constants` plus the quantization's (format, zero-point rule and block are compile-time)."""
    return {**kernel_constants(cfg, experts, hidden, width), "INT4": int(quant.format == "int4"),
            "SYMMETRIC": int(quant.symmetric), "QBLOCK": quant.block}


def launch_fused_moe_quantized_kernel(x: torch.Tensor, w_router: torch.Tensor, bias: torch.Tensor,
                                      *parts: torch.Tensor, cfg: MoEConfig,
                                      quant: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run `fused_moe_quantized_token_kernel` from Python on QFusedMoE's inputs (`parts` in QUANT_INPUT_NAMES[3:]
    order; CUDA, or CPU under TRITON_INTERPRET=1): how it is tested."""
    if triton is None:
        raise PluginError("triton is not installed")
    gate_up, down = parts[:3], parts[3:]
    experts, hidden, width = check_quantized_shapes(tuple(x.shape), tuple(w_router.shape), tuple(bias.shape),
                                                    [tuple(t.shape) for t in gate_up], [tuple(t.shape) for t in down],
                                                    cfg, quant)
    const = quantized_kernel_constants(cfg, quant, experts, hidden, width)
    tokens = x.shape[0]
    out = torch.empty_like(x)
    expert_idx = torch.empty(tokens, cfg.top_k, dtype=torch.int32, device=x.device)
    weights = torch.empty(tokens, cfg.top_k, dtype=torch.float32, device=x.device)
    if tokens:
        grid = (tokens, triton.cdiv(hidden, const["BLOCK_OUT"]))
        fused_moe_quantized_token_kernel[grid](x.contiguous(), w_router.float().contiguous(), bias.float().contiguous(),
                                               *(t.contiguous() for t in parts), tokens, out, expert_idx, weights,
                                               **const)
    return out, expert_idx, weights


TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def compile_fused_moe_kernel(cfg: MoEConfig, experts: int, hidden: int, width: int, dtype: str,
                             target: Any = None) -> tuple[str, str, dict[str, Any], int, int]:
    """AOT-compile the kernel to PTX: (kernel name, PTX text, constants, num_warps, shared memory bytes).
    `target` is a triton GPUTarget; None compiles for the GPU of this machine."""
    if triton is None:
        raise PluginError("triton is not installed; the AOT plugin needs it at engine build time")
    const = kernel_constants(cfg, experts, hidden, width)
    act = TRITON_DTYPES[dtype]
    signature = {"x_ptr": f"*{act}", "w_router_ptr": "*fp32", "bias_ptr": "*fp32", "w_gate_up_ptr": f"*{act}",
                 "w_down_ptr": f"*{act}", "num_tokens": "i32", "out_ptr": f"*{act}", "expert_idx_ptr": "*i32",
                 "weights_ptr": "*fp32", **{name: "constexpr" for name in const}}
    source = triton.compiler.ASTSource(fn=fused_moe_token_kernel, signature=signature, constexprs=const)
    compiled = triton.compile(source, target=target) if target is not None else triton.compile(source)
    return (compiled.metadata.name, compiled.asm["ptx"], const, compiled.metadata.num_warps,
            compiled.metadata.shared)


def compile_fused_moe_quantized_kernel(cfg: MoEConfig, quant: QuantConfig, experts: int, hidden: int, width: int,
                                       dtype: str, target: Any = None) -> tuple[str, str, dict[str, Any], int, int]:
    """`compile_fused_moe_kernel` for QFusedMoE: the quantized kernel to PTX (int8 code and zero-point pointers,
    float32 scale pointers)."""
    if triton is None:
        raise PluginError("triton is not installed; the AOT plugin needs it at engine build time")
    const = quantized_kernel_constants(cfg, quant, experts, hidden, width)
    act = TRITON_DTYPES[dtype]
    signature = {"x_ptr": f"*{act}", "w_router_ptr": "*fp32", "bias_ptr": "*fp32", "gu_codes_ptr": "*i8",
                 "gu_scales_ptr": "*fp32", "gu_zeros_ptr": "*i8", "d_codes_ptr": "*i8", "d_scales_ptr": "*fp32",
                 "d_zeros_ptr": "*i8", "num_tokens": "i32", "out_ptr": f"*{act}", "expert_idx_ptr": "*i32",
                 "weights_ptr": "*fp32", **{name: "constexpr" for name in const}}
    source = triton.compiler.ASTSource(fn=fused_moe_quantized_token_kernel, signature=signature, constexprs=const)
    compiled = triton.compile(source, target=target) if target is not None else triton.compile(source)
    return (compiled.metadata.name, compiled.asm["ptx"], const, compiled.metadata.num_warps,
            compiled.metadata.shared)


# ------------------------------------------------------------------------------------------------
# TensorRT registration


def tensorrt_version() -> tuple[int, ...] | None:
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: bindings present, libnvinfer missing
        return None
    return parse_version(trt.__version__)


_TRT_DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                    "INT8": "int8"}


def trt_dtype_name(dtype: Any) -> str:
    """tensorrt.DataType -> 'float32' etc. (by enum name, so it works for every binding version)."""
    return _TRT_DTYPE_NAMES.get(getattr(dtype, "name", str(dtype)).split(".")[-1], str(dtype))


def _torch_view(tensor: Any, torch_dtype: torch.dtype) -> torch.Tensor:
    """A torch tensor over a tensorrt.plugin.Tensor's device memory. bf16 has no __cuda_array_interface__
    typestr, so 2-byte types are viewed as int16 and reinterpreted."""
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shape = tuple(tensor.shape)
    strides = tuple(tensor.strides) if tensor.strides is not None else None
    carrier = {1: "|i1", 2: "<i2", 4: "<i4", 8: "<i8"}[itemsize]

    class _Interface:
        __cuda_array_interface__ = {"shape": shape, "typestr": carrier, "data": (tensor.data_ptr, False),
                                    "version": 3, "strides": None if strides is None else
                                    tuple(s * itemsize for s in strides)}

    raw = torch.as_tensor(_Interface(), device="cuda")
    return raw.view(torch_dtype)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int32": torch.int32, "int64": torch.int64, "int8": torch.int8}


def register_plugin(*, aot: bool = True) -> str:
    """Register `moe_ir::FusedMoE` with TensorRT's plugin registry; return the implementation: 'aot' (JIT
    @impl registered as well), 'python' or 'v3'. Idempotent: a second call (from this module or a copy of it)
    finds the creator already registered."""
    import tensorrt as trt

    version = parse_version(trt.__version__)
    kind = implementation_for(version, prefer_aot=aot and triton is not None)
    registry = trt.get_plugin_registry()
    if registry.get_creator(PLUGIN_OP, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None:
        return kind
    if kind == "v3":
        try:
            from moe_ir.backends.tensorrt import plugin_v3
        except ImportError:
            raise PluginError(f"TensorRT {trt.__version__} has no Python plugins (>= 10.6); its IPluginV3 "
                              f"fallback lives in moe_ir: pip install moe-ir on this machine") from None
        plugin_v3.register_creator()
        return kind
    _register_python_plugin(trt, with_aot=kind == "aot")
    return kind


def _register_python_plugin(trt: Any, with_aot: bool) -> None:
    from typing import Tuple

    import tensorrt.plugin as trtp

    def config(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation) -> MoEConfig:
        return MoEConfig.from_fields({"score_fn": score_fn, "top_k": top_k, "n_group": n_group,
                                      "topk_group": topk_group, "group_score": group_score, "normalize": normalize,
                                      "scale": scale, "activation": activation})

    @trtp.register(PLUGIN_ID)
    def fused_moe_desc(x: trtp.TensorDesc, w_router: trtp.TensorDesc, bias: trtp.TensorDesc,
                       w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, score_fn: int, top_k: int, n_group: int,
                       topk_group: int, group_score: int, normalize: int, scale: float, activation: int
                       ) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        cfg = config(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation)
        output_dtypes(trt_dtype_name(x.dtype), trt_dtype_name(w_router.dtype), trt_dtype_name(bias.dtype),
                      trt_dtype_name(w_gate_up.dtype), trt_dtype_name(w_down.dtype))
        _, idx_shape, w_shape = output_shapes(tuple(x.shape_expr), cfg)
        return (x.like(), trtp.from_shape_expr(idx_shape, dtype=trt.int32),
                trtp.from_shape_expr(w_shape, dtype=trt.float32))

    @trtp.impl(PLUGIN_ID)
    def fused_moe_impl(x: trtp.Tensor, w_router: trtp.Tensor, bias: trtp.Tensor, w_gate_up: trtp.Tensor,
                       w_down: trtp.Tensor, score_fn: int, top_k: int, n_group: int, topk_group: int,
                       group_score: int, normalize: int, scale: float, activation: int,
                       outputs: Tuple[trtp.Tensor], stream: int) -> None:
        cfg = config(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation)
        inputs = [_torch_view(t, _TORCH_DTYPES[trt_dtype_name(t.dtype)]) for t in (x, w_router, bias, w_gate_up, w_down)]
        results = [_torch_view(t, _TORCH_DTYPES[trt_dtype_name(t.dtype)]) for t in outputs]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            for target, value in zip(results, compute_fused_moe(*inputs, cfg)):
                target.copy_(value)

    _register_quantized_plugin(trt, trtp, with_aot)
    if not with_aot:
        return

    @trtp.aot_impl(PLUGIN_ID)
    def fused_moe_aot(x: trtp.TensorDesc, w_router: trtp.TensorDesc, bias: trtp.TensorDesc,
                      w_gate_up: trtp.TensorDesc, w_down: trtp.TensorDesc, score_fn: int, top_k: int, n_group: int,
                      topk_group: int, group_score: int, normalize: int, scale: float, activation: int,
                      outputs: Tuple[trtp.TensorDesc], tactic: int):
        cfg = config(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation)
        dims = [w_router.shape_expr[0], w_router.shape_expr[1], w_down.shape_expr[2]]
        if not all(d.is_constant for d in dims):
            raise PluginError(f"{PLUGIN_ID}: the AOT kernel needs static weight shapes (E, H, F)")
        experts, hidden, width = (d.constant_value() for d in dims)
        name, ptx, const, num_warps, shared = compile_fused_moe_kernel(
            cfg, experts, hidden, width, trt_dtype_name(x.dtype))
        tokens = x.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = tokens
        launch.grid_y = -(-hidden // const["BLOCK_OUT"])
        launch.block_x = num_warps * 32
        launch.shared_mem = shared
        # Scalar arguments sit between the input and output pointers; T is the only one.
        extra_args = trtp.SymIntExprs(1)
        extra_args[0] = trtp.SymInt32(tokens)
        return name.encode(), ptx.encode(), launch, extra_args


def _register_quantized_plugin(trt: Any, trtp: Any, with_aot: bool) -> None:
    """QFusedMoE: the shape/type function, the JIT @impl and (with_aot) the AOT kernel."""
    from typing import Tuple

    def configs(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation, quant_format, bits,
                block, symmetric) -> tuple[MoEConfig, QuantConfig]:
        cfg = MoEConfig.from_fields({"score_fn": score_fn, "top_k": top_k, "n_group": n_group,
                                     "topk_group": topk_group, "group_score": group_score, "normalize": normalize,
                                     "scale": scale, "activation": activation})
        return cfg, QuantConfig.from_fields({"quant_format": quant_format, "bits": bits, "block": block,
                                             "symmetric": symmetric})

    @trtp.register(QUANT_PLUGIN_ID)
    def qfused_moe_desc(x: trtp.TensorDesc, w_router: trtp.TensorDesc, bias: trtp.TensorDesc,
                        w_gate_up_codes: trtp.TensorDesc, w_gate_up_scales: trtp.TensorDesc,
                        w_gate_up_zeros: trtp.TensorDesc, w_down_codes: trtp.TensorDesc, w_down_scales: trtp.TensorDesc,
                        w_down_zeros: trtp.TensorDesc, score_fn: int, top_k: int, n_group: int, topk_group: int,
                        group_score: int, normalize: int, scale: float, activation: int, quant_format: int, bits: int,
                        block: int, symmetric: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        cfg, quant = configs(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation,
                             quant_format, bits, block, symmetric)
        parts = (w_gate_up_codes, w_gate_up_scales, w_gate_up_zeros, w_down_codes, w_down_scales, w_down_zeros)
        quantized_output_dtypes(trt_dtype_name(x.dtype), trt_dtype_name(w_router.dtype), trt_dtype_name(bias.dtype),
                                [trt_dtype_name(p.dtype) for p in parts])
        _, idx_shape, w_shape = output_shapes(tuple(x.shape_expr), cfg)
        return (x.like(), trtp.from_shape_expr(idx_shape, dtype=trt.int32),
                trtp.from_shape_expr(w_shape, dtype=trt.float32))

    @trtp.impl(QUANT_PLUGIN_ID)
    def qfused_moe_impl(x: trtp.Tensor, w_router: trtp.Tensor, bias: trtp.Tensor, w_gate_up_codes: trtp.Tensor,
                        w_gate_up_scales: trtp.Tensor, w_gate_up_zeros: trtp.Tensor, w_down_codes: trtp.Tensor,
                        w_down_scales: trtp.Tensor, w_down_zeros: trtp.Tensor, score_fn: int, top_k: int,
                        n_group: int, topk_group: int, group_score: int, normalize: int, scale: float,
                        activation: int, quant_format: int, bits: int, block: int, symmetric: int,
                        outputs: Tuple[trtp.Tensor], stream: int) -> None:
        cfg, quant = configs(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation,
                             quant_format, bits, block, symmetric)
        tensors = (x, w_router, bias, w_gate_up_codes, w_gate_up_scales, w_gate_up_zeros, w_down_codes, w_down_scales,
                   w_down_zeros)
        inputs = [_torch_view(t, _TORCH_DTYPES[trt_dtype_name(t.dtype)]) for t in tensors]
        results = [_torch_view(t, _TORCH_DTYPES[trt_dtype_name(t.dtype)]) for t in outputs]
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            for target, value in zip(results, fused_moe_quantized_torch(*inputs, cfg, quant)):
                target.copy_(value)

    if not with_aot:
        return

    @trtp.aot_impl(QUANT_PLUGIN_ID)
    def qfused_moe_aot(x: trtp.TensorDesc, w_router: trtp.TensorDesc, bias: trtp.TensorDesc,
                       w_gate_up_codes: trtp.TensorDesc, w_gate_up_scales: trtp.TensorDesc,
                       w_gate_up_zeros: trtp.TensorDesc, w_down_codes: trtp.TensorDesc, w_down_scales: trtp.TensorDesc,
                       w_down_zeros: trtp.TensorDesc, score_fn: int, top_k: int, n_group: int, topk_group: int,
                       group_score: int, normalize: int, scale: float, activation: int, quant_format: int, bits: int,
                       block: int, symmetric: int, outputs: Tuple[trtp.TensorDesc], tactic: int):
        cfg, quant = configs(score_fn, top_k, n_group, topk_group, group_score, normalize, scale, activation,
                             quant_format, bits, block, symmetric)
        dims = [w_router.shape_expr[0], w_router.shape_expr[1], w_down_codes.shape_expr[2]]
        if not all(d.is_constant for d in dims):
            raise PluginError(f"{QUANT_PLUGIN_ID}: the AOT kernel needs static weight shapes (E, H, F)")
        experts, hidden, stored = (d.constant_value() for d in dims)
        name, ptx, const, num_warps, shared = compile_fused_moe_quantized_kernel(
            cfg, quant, experts, hidden, stored * 8 // quant.bits, trt_dtype_name(x.dtype))
        tokens = x.shape_expr[0]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = tokens
        launch.grid_y = -(-hidden // const["BLOCK_OUT"])
        launch.block_x = num_warps * 32
        launch.shared_mem = shared
        extra_args = trtp.SymIntExprs(1)  # T, between the input and output pointers
        extra_args[0] = trtp.SymInt32(tokens)
        return name.encode(), ptx.encode(), launch, extra_args
