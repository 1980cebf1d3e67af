"""YAML spec reader: safe loading only, with a key-path -> line table so errors point at the file.

PyYAML's SafeLoader builds only plain data (no `!!python/object` tags), and we walk the composed node
tree ourselves to record where each key sits and to reject duplicate keys, which PyYAML would
otherwise resolve silently by keeping the last one.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import SpecError
from ..model_spec import ModelSpec, model_spec_from_dict
from ..spec import LayerSpec, spec_from_dict


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int], file: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in seen:
                raise SpecError(f"duplicate key '{key}'", path=sub, line=key_node.start_mark.line + 1, file=file)
            seen.add(key)
            lines[sub] = key_node.start_mark.line + 1
            _record_lines(value_node, sub, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            lines[sub] = item.start_mark.line + 1
            _record_lines(item, sub, lines, file)


def parse_yaml(text: str, file: str = "<spec>") -> tuple[object, dict[str, int]]:
    """Plain data and the key-path -> line table of one YAML document."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("the spec is empty; expected a mapping with at least 'hidden' and 'experts'", file=file)
        lines: dict[str, int] = {"": node.start_mark.line + 1}
        _record_lines(node, "", lines, file)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = err.problem or err.context or "invalid YAML"
        if "could not determine a constructor" in str(err):
            problem = f"YAML tag not allowed in a spec ({problem.strip()}); specs hold plain data only"
        raise SpecError(f"YAML error: {problem}", line=line, file=file) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", file=file) from None
    finally:
        loader.dispose()
    return data, lines


def load_spec_text(text: str, file: str = "<spec>") -> LayerSpec:
    data, lines = parse_yaml(text, file)
    return spec_from_dict(data, lines=lines, file=file)


def load_spec(path: str | Path) -> LayerSpec:
    """Read and check a spec file; every problem is one SpecError naming the file, line and key path."""
    path = Path(path)
    return load_spec_text(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such spec file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read spec: {err}", file=str(path)) from None


def load_model_spec_text(text: str, file: str = "<spec>") -> ModelSpec:
    data, lines = parse_yaml(text, file)
    return model_spec_from_dict(data, lines=lines, file=file)


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read and check a model spec file (top-level sections `model:` and `moe:`)."""
    path = Path(path)
    return load_model_spec_text(_read_text(path), str(path))


def load_any_text(text: str, file: str = "<spec>") -> LayerSpec | ModelSpec:
    """A model spec when the document has a top-level `model` key, else a layer spec."""
    data, lines = parse_yaml(text, file)
    if isinstance(data, dict) and "model" in data:
        return model_spec_from_dict(data, lines=lines, file=file)
    return spec_from_dict(data, lines=lines, file=file)


def load_any(path: str | Path) -> LayerSpec | ModelSpec:
    """Read a layer or a model spec, whichever the file holds (dispatch on a top-level `model` key)."""
    path = Path(path)
    return load_any_text(_read_text(path), str(path))
