"""Imports point down only: pacs_node -> pipeline -> model (shared/DESIGN.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: packages each layer must not import
FORBIDDEN = {"model": {"pipeline", "pacs_node", "pydicom", "pynetdicom", "highdicom"}, "pipeline": {"pacs_node", "pynetdicom"}}


def imported_top_levels(path: Path) -> set[str]:
    """Top-level package names a module imports (anywhere in the file, lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer):
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_top_levels(path) & FORBIDDEN[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{layer} imports upward or outside its layer: {offenders}"


def test_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pacs_node.cli import app\n    import pydicom.dataset\n")
    assert imported_top_levels(module) == {"pacs_node", "pydicom"}
