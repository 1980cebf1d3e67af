"""YAML spec reader: safe loading only, with a key-path -> line table so errors point at the file.

PyYAML's SafeLoader builds only plain data (no `!!python/object` tags), and we walk the composed node
tree ourselves to record where each key sits and to reject duplicate keys, which PyYAML would
otherwise resolve silently by keeping the last one. Anchors and aliases are allowed, but an aliased
node is walked once (a YAML "billion laughs" document stays linear, a self-referencing alias ends).
What is read is bounded before it costs time: the file size before parsing, the node count and the nesting
depth while composing; a value a tag's constructor cannot build is a SpecError at its line.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from moe_ir.errors import SpecError
from moe_ir.model_spec import ModelSpec, model_spec_from_dict
from moe_ir.spec import LayerSpec, spec_from_dict


# Bounds on what is read. A spec is a few dozen keys (the shipped ones are under 2 KiB and 80 YAML nodes);
# PyYAML is pure Python (~40 us a node here), so a large document would take minutes before any check
# of its content: the file size is checked before parsing and the node count while composing.
MAX_SPEC_BYTES = 64 * 1024
MAX_SPEC_NODES = 4096
MAX_SPEC_DEPTH = 64  # a spec nests four levels; deeper documents are refused before Python's recursion limit


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats such as `1e-3` and `2.5e3` as numbers, as YAML 1.2 does.
    PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent, so `gamma: 1e-3` would fail
    as "expected a number, found string". Subclassed so the global SafeLoader is left as it is.

    It also counts the nodes it composes (at most MAX_SPEC_NODES) and turns a value its constructors
    cannot build (`!!int abc`, `!!timestamp x`, an integer of more digits than Python converts) into a
    SpecError at that value's line, where PyYAML would raise a bare ValueError or AttributeError."""

    file = "<spec>"
    nodes = 0
    depth = 0

    def compose_node(self, parent, index):
        self.nodes += 1
        mark = self.peek_event().start_mark
        if self.nodes > MAX_SPEC_NODES:
            raise SpecError(f"the document has more than {MAX_SPEC_NODES:,} YAML nodes; a spec has a few dozen",
                            line=mark.line + 1, file=self.file)
        if self.depth >= MAX_SPEC_DEPTH:
            raise SpecError(f"YAML error: the document nests too deeply to be a spec (more than {MAX_SPEC_DEPTH} "
                            "levels; a spec has four)", line=mark.line + 1, file=self.file)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (yaml.YAMLError, SpecError, RecursionError):
            raise
        except Exception as err:  # noqa: BLE001 - any failure of a constructor is a value it cannot read
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            text = node.value if isinstance(node.value, str) else ""
            if "integer string conversion" in str(err):
                reason = f"an integer of {len(text):,} characters"
            elif isinstance(err, ValueError) and str(err):
                reason = str(err).splitlines()[0][:120]
            else:  # the constructor's own internals (e.g. a failed regex match): say only what was found
                reason = f"found {text[:40]!r}"
            raise SpecError(f"YAML error: not a valid {tag} value ({reason})",
                            line=node.start_mark.line + 1, file=self.file) from None


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9][0-9_]*(\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _record_lines(node: yaml.Node, path: str, lines: dict[str, int], file: str, seen_nodes: set[int]) -> None:
    # An alias is the same node object as its anchor: its keys already have their lines (a key path
    # below the alias falls back to the alias's own key), and walking it again would be exponential.
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in seen:
                raise SpecError(f"duplicate key '{key}'", path=sub, line=key_node.start_mark.line + 1, file=file)
            seen.add(key)
            lines[sub] = key_node.start_mark.line + 1
            _record_lines(value_node, sub, lines, file, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            lines[sub] = item.start_mark.line + 1
            _record_lines(item, sub, lines, file, seen_nodes)


def parse_yaml(text: str, file: str = "<spec>") -> tuple[object, dict[str, int]]:
    """Plain data and the key-path -> line table of one YAML document."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"the document is {len(text):,} characters long; a spec is at most {MAX_SPEC_BYTES:,}",
                        file=file)
    try:
        # Inside the try: the reader checks the characters as it is made (a control character is a YAMLError).
        loader = _SpecLoader(text)
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {' '.join(str(err).split())}", file=file) from None
    loader.file = file
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError("the spec is empty; expected a mapping with at least 'hidden' and 'experts'", file=file)
        lines: dict[str, int] = {"": node.start_mark.line + 1}
        _record_lines(node, "", lines, file, set())
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = err.problem or err.context or "invalid YAML"
        if "could not determine a constructor" in str(err):
            problem = f"YAML tag not allowed in a spec ({problem.strip()}); specs hold plain data only"
        elif "but found another document" in str(err):
            problem = "a spec file holds one YAML document; remove the second '---' and what follows it"
        raise SpecError(f"YAML error: {problem}", line=line, file=file) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", file=file) from None
    except RecursionError:
        raise SpecError("YAML error: the document nests too deeply to be a spec", file=file) from None
    finally:
        loader.dispose()
    return data, lines


def load_spec_text(text: str, file: str = "<spec>") -> LayerSpec:
    data, lines = parse_yaml(text, file)
    if isinstance(data, dict) and "model" in data:
        # Otherwise the layer parser reports "unknown key 'model'", which hides what the file is.
        raise SpecError("this is a model spec (it has a top-level 'model' section) and a layer spec is needed "
                        "here; read it with load_model_spec or load_any, or take the layer from its 'moe' section",
                        path="model", line=lines.get("model"), file=file)
    return spec_from_dict(data, lines=lines, file=file)


def load_spec(path: str | Path) -> LayerSpec:
    """Read and check a spec file; every problem is one SpecError naming the file, line and key path."""
    path = Path(path)
    return load_spec_text(_read_text(path), str(path))


def _read_text(path: Path) -> str:
    # Read one byte past the limit instead of trusting the size on disk: /dev/zero or a pipe has none.
    try:
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            raise SpecError(f"the file is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a few KiB of YAML",
                            file=str(path))
        return data.decode("utf-8")
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
