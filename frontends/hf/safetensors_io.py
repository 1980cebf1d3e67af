"""Safetensors checkpoints read and written one tensor at a time.

`Checkpoint` lists a checkpoint's tensors (name, shape, dtype, file) from the file headers alone: a
`model.safetensors`, shards through `*.safetensors.index.json`, a folder, or an in-memory state dict.
Every problem the listing can see (a missing shard, a malformed `weight_map`, a tensor in two files, a
shard that does not hold what the index says) is a WeightsError naming the file, before any tensor is read.
`read_many(names)` then loads tensors (safetensors' `safe_open`, the file open for that call only).

`SafetensorsWriter` writes a safetensors file whose header (every name, dtype and shape) is known up front,
then takes the tensors in any order: a converter holds only the tensors of the rule it is applying, so
converting a checkpoint never holds two copies of the model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from moe_ir.errors import WeightsError

__all__ = ["FLOAT_DTYPES", "Checkpoint", "SafetensorsWriter", "TensorEntry", "dtype_name", "torch_dtype_of",
           "unlink_quietly"]

# safetensors dtype names of the floating dtypes a weight may be stored in (cast to the graph's dtype on import)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_TORCH_NAMES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
                "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def dtype_name(dtype) -> str:
    """safetensors' name of a torch dtype (F32, BF16, ...)."""
    return _TORCH_NAMES.get(str(dtype).removeprefix("torch."), str(dtype))


def _torch_dtype(name: str):
    import torch

    for torch_name, st in _TORCH_NAMES.items():
        if st == name:
            return getattr(torch, torch_name)
    raise WeightsError(f"safetensors dtype {name} has no torch dtype here")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: str            # the safetensors file holding it ('<state dict>' for an in-memory source)
    shape: tuple[int, ...]
    dtype: str           # safetensors' dtype name


class Checkpoint:
    """The tensors of a checkpoint, listed from headers; `read` loads one. Use as a context manager."""

    def __init__(self, source: Any):
        self._tensors: Mapping[str, Any] | None = None
        if isinstance(source, Mapping) or _is_module(source):
            tensors = source.state_dict() if _is_module(source) else source
            self._tensors = tensors
            self.entries = {k: TensorEntry("<state dict>", tuple(t.shape), dtype_name(t.dtype))
                            for k, t in tensors.items()}
            self.description = "the state dict"
            return
        paths = [source] if isinstance(source, (str, Path)) else list(source)
        if not paths:
            raise WeightsError("no weights given: pass a safetensors file, a folder, or a *.safetensors.index.json")
        self.entries: dict[str, TensorEntry] = {}
        for p in paths:
            for file, names in _files_of(Path(p)):
                self._list(file, names)
        self.description = ", ".join(str(p) for p in paths)

    def _list(self, file: Path, wanted: set[str] | None) -> None:
        from safetensors import SafetensorError, safe_open

        if not file.is_file():
            raise WeightsError(f"{file}: no such weights file" + (" (a shard named by the safetensors index)"
                                                                    if wanted is not None else ""))
        try:
            with safe_open(str(file), framework="pt") as fh:
                held = set(fh.keys())
                names = held if wanted is None else wanted
                absent = sorted(names - held)
                if absent:
                    raise WeightsError(f"{file}: the safetensors index places {len(absent)} tensors in this shard "
                                       f"that it does not hold: {', '.join(absent[:6])}"
                                       + (" ..." if len(absent) > 6 else ""))
                for name in sorted(names):
                    if name in self.entries:
                        raise WeightsError(f"{file}: tensor {name} is also in {self.entries[name].file}; a "
                                           "checkpoint holds each tensor once")
                    piece = fh.get_slice(name)
                    self.entries[name] = TensorEntry(str(file), tuple(piece.get_shape()), piece.get_dtype())
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{file}: not a readable safetensors file ({err})") from None

    def read(self, name: str):
        """One tensor, as stored."""
        return self.read_many([name])[0]

    def read_many(self, names: list[str]) -> list:
        """The named tensors, as stored. Each file is opened for this call only: safetensors maps the file and
        hands out tensors backed by the mapping, so pages read through a handle kept open would stay resident
        until it closes; closed per call, memory holds only the tensors the caller still references."""
        if self._tensors is not None:
            return [self._tensors[n] for n in names]
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n].file, []).append(n)
        found = {}
        for file, in_file in by_file.items():
            try:
                with safe_open(file, framework="pt") as handle:
                    for n in in_file:
                        found[n] = handle.get_tensor(n)
            except (SafetensorError, OSError) as err:
                raise WeightsError(f"{file}: cannot read tensors {', '.join(in_file[:4])} ({err})") from None
        return [found[n] for n in names]

    def close(self) -> None:
        """Nothing stays open between reads; kept so a Checkpoint reads as a context manager."""

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_module(source: Any) -> bool:
    return hasattr(source, "state_dict") and hasattr(source, "named_parameters")


def _files_of(path: Path) -> list[tuple[Path, set[str] | None]]:
    """(file, tensor names it must hold or None for all) for a file, a folder or an index json."""
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if (path / "model.safetensors.index.json").exists():
            indexes = [path / "model.safetensors.index.json"]
        if len(indexes) > 1:
            raise WeightsError(f"{path}: several safetensors indexes ({', '.join(i.name for i in indexes)}); pass "
                               "the one to read")
        if indexes:
            return _index_files(indexes[0])
        if (path / "model.safetensors").exists():
            return [(path / "model.safetensors", None)]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{path}: no model.safetensors, *.safetensors or *.safetensors.index.json in this "
                               "folder")
        return [(f, None) for f in files]
    if path.name.endswith(".json"):
        return _index_files(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such weights file")
    return [(path, None)]


def _index_files(index: Path) -> list[tuple[Path, set[str]]]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{index}: no such safetensors index") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise WeightsError(f"{index}: not a readable JSON safetensors index ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: 'weight_map' must be a non-empty JSON object of tensor name -> shard file, "
                           f"found {type(weight_map).__name__ if weight_map is not None else 'none'}")
    shards: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        # A shard is a file beside the index: a path that leaves the folder is refused, not followed.
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise WeightsError(f"{index}: weight_map['{name}'] = {shard!r} is not a shard file name beside the "
                               "index")
        shards.setdefault(shard, set()).add(name)
    missing = sorted(s for s in shards if not (index.parent / s).is_file())
    if missing:
        raise WeightsError(f"{index}: {len(missing)} of {len(shards)} shards are missing: {', '.join(missing[:6])}"
                           + (" ..." if len(missing) > 6 else "") + "; download them beside the index")
    return [(index.parent / s, names) for s, names in sorted(shards.items())]


class SafetensorsWriter:
    """Write a safetensors file tensor by tensor into its place; the header is fixed at creation.

    `entries`: (name, torch dtype, shape) in file order. `write(name, tensor)` checks dtype and shape;
    `finish()` checks that every tensor was written. Tensors are aligned to 8 bytes like safetensors' own."""

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, Any, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._layout: dict[str, tuple[int, Any, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in entries:
            shape = tuple(int(d) for d in shape)
            nbytes = dtype.itemsize
            for d in shape:
                nbytes *= d
            header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, dtype, shape)
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._base = 8 + len(text)
        self._pending = set(self._layout)
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._file.truncate(self._base + offset)

    def write(self, name: str, tensor) -> None:
        offset, dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise WeightsError(f"{self.path}: tensor {name} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, the "
                               f"header says {dtype_name(dtype)} {list(shape)}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(_byte_dtype()).numpy()
        self._file.seek(self._base + offset)
        self._file.write(memoryview(data))
        self._pending.discard(name)

    def finish(self) -> None:
        self._file.close()
        if self._pending:
            raise WeightsError(f"{self.path}: {len(self._pending)} tensors were never written: "
                               + ", ".join(sorted(self._pending)[:6]))

    def abort(self) -> None:
        self._file.close()


def _byte_dtype():
    import torch

    return torch.uint8


def torch_dtype_of(entry: TensorEntry):
    return _torch_dtype(entry.dtype)


def unlink_quietly(paths: Iterable[str | os.PathLike]) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
