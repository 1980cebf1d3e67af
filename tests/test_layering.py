"""Layering: the import contracts of pyproject.toml (import-linter), imports an editor can follow, and the
commands that must not import torch.

import-linter reads the package as installed: frontends/ and backends/ inside moe_ir (pyproject's
package-dir). An editable install maps them with an import hook that a static import graph cannot see, so
the test assembles that layout from symlinks and lints it.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# moe_ir's sub-packages that live beside it in the repository
MAPPED = ("backends", "frontends")


@pytest.fixture(scope="module")
def installed_layout(tmp_path_factory) -> Path:
    """A folder holding `moe_ir/` as it is installed: the core's files plus backends/ and frontends/."""
    root = tmp_path_factory.mktemp("layout")
    package = root / "moe_ir"
    package.mkdir()
    for entry in (REPO / "moe_ir").iterdir():
        if entry.name not in ("__pycache__", *MAPPED):  # a developer may have linked them there already
            (package / entry.name).symlink_to(entry)
    for folder in MAPPED:
        (package / folder).symlink_to(REPO / folder)
    return root


def test_import_contracts_hold(installed_layout):
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), str(REPO / "pyproject.toml"), "--no-cache"],
                            cwd=installed_layout, env={**os.environ, "PYTHONPATH": str(installed_layout)},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in result.stdout, result.stdout[-2000:]


def test_contracts_cover_the_whole_core():
    """A new core module must join the core contract's list (else it could import a backend unchecked)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (core,) = [c for c in config["contracts"] if c["name"].startswith("The core")]
    modules = {f"moe_ir.{p.stem}" for p in (REPO / "moe_ir").iterdir()
               if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.stem not in ("__init__", *MAPPED)}
    assert set(core["source_modules"]) == modules - {"moe_ir.cli", "moe_ir.cli_generate"}


def _climbing_imports(folder: str) -> list[str]:
    """Relative imports in backends/ or frontends/ that climb above that folder (`from ..ir import Graph` in
    backends/x.py): they resolve only once installed inside moe_ir, so tools opened on the repository
    cannot follow them. The core is imported absolutely (`from moe_ir.ir import Graph`)."""
    found = []
    for path in (REPO / folder).rglob("*.py"):
        depth = len(path.relative_to(REPO / folder).parts)  # backends/x.py: 1; backends/onnx/x.py: 2
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level > depth:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


@pytest.mark.parametrize("folder", MAPPED)
def test_core_is_imported_absolutely(folder):
    assert _climbing_imports(folder) == []


def _private_imports() -> list[str]:
    """`from moe_ir.x import _name` (or a relative form) reaching into another module's private names."""
    found = []
    for folder in ("moe_ir", *MAPPED):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    if private:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno} {', '.join(private)}")
    return found


def test_no_module_imports_another_modules_private_names():
    assert _private_imports() == []


@pytest.mark.parametrize("argv", [["--help"], ["schema"], ["inspect", "specs/deepseek-v3.yaml"],
                                  ["inspect", "specs/models/deepseek-v3.yaml", "--json"]])
def test_light_commands_import_no_torch(argv):
    """`moe-ir --help`, `inspect` and `schema` answer without importing torch (which takes seconds)."""
    code = ("import sys, contextlib, io\nfrom moe_ir.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        rc = main(sys.argv[1:])\n    except SystemExit as e:\n        rc = e.code\n"
            "print(rc, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["0", "False"], result.stdout + result.stderr[-2000:]


def test_import_moe_ir_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", "import sys, moe_ir; print('torch' in sys.modules)"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr[-2000:]
