"""The package's layers: lower parts never import upper ones, so each can be read and tested alone.

From the bottom: io (storage) and schemas (config, records, the on-disk contract); backends (the model base
and registry); models (generation, scoring, vlm) and filters; pipeline; report, jobs, tools, cli on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import styledistill

PACKAGE = Path(styledistill.__file__).parent

# part -> the parts it must never import (module-level or inside functions).
FORBIDDEN = {
    "io": {"schemas", "backends", "generation", "scoring", "vlm", "filters", "pipeline", "report", "jobs", "tools",
           "cli"},
    "schemas": {"backends", "generation", "scoring", "vlm", "filters", "pipeline", "report", "jobs", "tools",
                "cli"},
    "backends": {"pipeline", "report", "jobs", "tools", "cli"},
    "generation": {"pipeline", "report", "jobs", "tools", "cli", "filters"},
    "scoring": {"pipeline", "report", "jobs", "tools", "cli", "filters"},
    "vlm": {"pipeline", "report", "jobs", "tools", "cli", "filters", "scoring"},
    "filters": {"pipeline", "report", "jobs", "tools", "cli", "generation", "scoring", "vlm"},
    "report": {"pipeline", "jobs", "tools", "cli"},
    "pipeline": {"report", "jobs", "tools", "cli"},
}
# The deliberate upward calls: a finished run (or audit) writes its report.
ALLOWED = {("styledistill.pipeline.run", "styledistill.report"), ("styledistill.pipeline.audit", "styledistill.report")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("styledistill.")}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        yield ".".join(relative.parts).removesuffix(".__init__"), path


@pytest.mark.parametrize("module,path", list(_modules()), ids=lambda v: v if isinstance(v, str) else "")
def test_no_module_imports_a_layer_above_it(module, path):
    forbidden = FORBIDDEN.get(_part(module), set())
    bad = sorted(imported for imported in _imports(path)
                 if _part(imported) in forbidden
                 and not any(module == m and imported.startswith(up) for m, up in ALLOWED))
    assert not bad, f"{module} imports {bad}, a layer above it"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from styledistill.pipeline import run\n")
    assert _imports(bad) == {"styledistill.pipeline"}
