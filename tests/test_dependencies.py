"""Every module the `styledistill` package imports is the standard library, the package itself, or comes from a
distribution that pyproject.toml declares in `project.dependencies`.

Imports are read with `ast` from every source file, lazy ones inside functions included (the backends import
their libraries there), plus `importlib.import_module("name")` / `__import__("name")` with a literal name. An
import name is mapped to its distributions with `importlib.metadata.packages_distributions()` (`yaml` ->
PyYAML, `PIL` -> pillow). A library that is only installed because some declared dependency pulls it in still
has to be declared when the package imports it itself: the dependency that pulls it in may stop doing so.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "styledistill"


def normalise(name: str) -> str:
    """PEP 503 project name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalise(re.match(r"[A-Za-z0-9._-]+", spec.strip()).group()) for spec in project["dependencies"]}


def imported_names(tree: ast.AST) -> list[tuple[str, int]]:
    """(top-level module name, line) of every absolute import anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.partition(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.partition(".")[0], node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and not node.args[0].value.startswith("."):
                found.append((node.args[0].value.partition(".")[0], node.lineno))
    return found


def third_party_imports() -> dict[str, list[str]]:
    """Import name -> the places (file:line) that import it, for everything but stdlib and the package."""
    where: dict[str, list[str]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name, line in imported_names(tree):
            if name == PACKAGE or name in sys.stdlib_module_names or name == "__future__":
                continue
            where.setdefault(name, []).append(f"{path.relative_to(ROOT)}:{line}")
    return where


def test_the_import_scan_sees_lazy_imports_inside_functions():
    tree = ast.parse("import os\n"
                     "def f():\n    import torch.nn\n    from PIL import Image\n    from . import sibling\n"
                     "    return importlib.import_module('open_clip'), __import__('yaml')\n")
    assert [name for name, _ in imported_names(tree)] == ["os", "torch", "PIL", "open_clip", "yaml"]
    imports = third_party_imports()
    assert {"torch", "numpy", "ray", "diffusers"} <= set(imports)
    assert not {"os", "json", "__future__", PACKAGE} & set(imports)


def test_every_import_of_the_package_is_a_declared_dependency():
    declared = declared_distributions()
    distributions = packages_distributions()
    undeclared = []
    for name, places in sorted(third_party_imports().items()):
        # Not installed here: then the import name itself has to be a declared project name.
        candidates = distributions.get(name) or [name]
        if not any(normalise(dist) in declared for dist in candidates):
            shown = ", ".join(places[:3]) + (f" (+{len(places) - 3} more)" if len(places) > 3 else "")
            undeclared.append(f"{name} (distribution {' or '.join(candidates)}), imported at {shown}")
    assert not undeclared, "imported but not in pyproject.toml's project.dependencies:\n  " + "\n  ".join(undeclared)
