"""README examples are code: the spec example parses, and the commands it lists exist."""
from __future__ import annotations

import re
from pathlib import Path

from moe_ir.cli import build_parser
from moe_ir.frontends import load_spec_text

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_spec_example_parses():
    block = README.split("## The spec", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = load_spec_text(block, "README.md")
    assert spec.experts.routed == 64 and spec.router.group_limit.groups == 8 and spec.parallel.expert_parallel == 8


def test_listed_commands_exist():
    commands = set(re.findall(r"^\| `moe-ir ([a-z-]+)", README, flags=re.M))
    known = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands and commands <= known, commands - known
