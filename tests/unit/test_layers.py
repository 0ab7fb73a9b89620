"""The package's layers: every import of a serve_app module runs downward (or stays in its
own subpackage), as the package docstring and docs/architecture.md draw them."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "serve_app"

# Lower numbers are lower layers. Subpackages of one layer stand side by side: neither
# imports the other.
LAYERS: dict[str, float] = {
    # the ground, in its own order
    "serve_app.config": 0, "serve_app.envs": 0, "serve_app.errors": 0, "serve_app.demo": 0,
    "serve_app.observability": -1,  # under the ground (errors uses its request ids)
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


def _imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from` import names: `from ..deployments import x` in
    `serve_app.api.app` is `serve_app.deployments`, as Python resolves it."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > len(package):
        raise ValueError(f"{module}: a relative import above the package")
    base = package[:len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every serve_app module `source` (the text of `module`) imports, at its top or inside
    a function, relative imports resolved."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = _imported_from(node, module, is_package)
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.startswith("serve_app.")}


def _imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), _module_name(path), path.name == "__init__.py")


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


@pytest.mark.parametrize(
    ("source", "module", "is_package", "imported"),
    [
        ("from ..deployments import build", "serve_app.api.app", False,
         "serve_app.deployments"),
        ("from .. import handles", "serve_app.api.app", False, "serve_app.handles"),
        ("from .middleware import deny", "serve_app.api.app", False,
         "serve_app.api.middleware"),
        ("from ..api import app", "serve_app.prompts", True, "serve_app.api"),
        ("def f():\n    from ...upstream.call import UpstreamCall\n",
         "serve_app.prompts.x.y", False, "serve_app.upstream.call"),
    ],
)
def test_relative_imports_are_resolved(source: str, module: str, is_package: bool,
                                       imported: str) -> None:
    """A relative import is checked as the module it names: `from ..deployments import x`
    in `api/` imports the edge, whatever its spelling."""
    assert imported in imports_of(source, module, is_package)


def test_observability_imports_only_ray_orjson_and_the_standard_library() -> None:
    """Under the ground, every layer records through it: it may not pull in more."""
    allowed = {"ray", "orjson", "serve_app", *sys.stdlib_module_names}
    for path in sorted((PACKAGE / "observability").glob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                tops |= {alias.name.split(".")[0] for alias in node.names}
        assert tops <= allowed, f"{path.name} imports {sorted(tops - allowed)}"


def test_every_module_says_what_it_owns() -> None:
    for path in MODULES:
        docstring = ast.get_docstring(ast.parse(path.read_text()))
        assert docstring and docstring.strip(), f"{path.relative_to(PACKAGE)} has no docstring"
