"""The package's layers: every import of a serve_app module runs downward (or stays in its
own subpackage), as the package docstring and docs/architecture.md draw them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serve_app"

# Lower numbers are lower layers. Subpackages of one layer stand side by side: neither
# imports the other.
LAYERS: dict[str, float] = {
    # the ground, in its own order
    "serve_app.config": 0, "serve_app.envs": 0, "serve_app.errors": 0, "serve_app.demo": 0,
    "serve_app.observability": -1,  # under the ground (errors uses its request ids): ray, stdlib
    "serve_app.json_body": 0.2,
    "serve_app.protocol": 0.3, "serve_app.endpoint": 0.3, "serve_app.limits": 0.6,
    "serve_app.prompts": 1,
    "serve_app.upstream": 2, "serve_app.sentence": 2, "serve_app.reference": 2,
    "serve_app.api": 3,
    "serve_app.privacy": 3.5,  # the offline audit (loads the whole model); nothing imports it
    "serve_app.client": 3.5,
    # the edge
    "serve_app.handles": 4, "serve_app.allocator": 4, "serve_app.proxy_guard": 4,
    "serve_app.deployments": 5,
    "serve_app.deploy": 6,
}


def _unit(module: str) -> str:
    """The layer entry a module belongs to: its subpackage, or itself at the top level."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every serve_app module the file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("serve_app.")}


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    units = {_unit(_module_name(path)) for path in MODULES} - {"serve_app"}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_downward(path: Path) -> None:
    here = _unit(_module_name(path))
    if here == "serve_app":
        return  # the package's own __init__ imports nothing of its parts
    for imported in _imports(path):
        there = _unit(imported)
        if there not in LAYERS or there == here:
            continue  # a name imported from a module (`from serve_app.x import y`)
        assert LAYERS[there] < LAYERS[here], f"{here} imports {imported}"


def test_every_module_says_what_it_owns() -> None:
    for path in MODULES:
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.strip(), f"{path.relative_to(PACKAGE)} has no docstring"
