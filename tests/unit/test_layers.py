"""Imports point down: pfstorer <- registry <- pipelines, serving <- demo.

Read from the source (every import statement, top level or inside a function), so a lazy import
that crosses a layer fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "pfstorer": {"registry", "pipelines", "serving", "demo"},
    "registry": {"pipelines", "serving", "demo"},
    "pipelines": {"serving", "demo"},
    "serving": {"pipelines", "demo"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    crossing = {str(f.relative_to(REPO)): sorted(_imports(f) & FORBIDDEN[package]) for f in files}
    assert {f: bad for f, bad in crossing.items() if bad} == {}
