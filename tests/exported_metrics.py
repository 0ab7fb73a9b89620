"""The gateway's metrics as Prometheus sees them: each metric defined in
`serve_app.observability.metrics`, its kind, and the names Ray's exporter gives it.

Read from the module's source, so nothing is created: `ray_` before every name, `_total`
after a counter's, `_bucket`, `_sum` and `_count` after a histogram's (checked against a
live scrape in tests/integration/test_metrics_serve.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

from serve_app.observability import metrics

KINDS = {"Counter": "counter", "Histogram": "histogram", "Gauge": "gauge"}


def defined_metrics() -> dict[str, str]:
    """Each metric's name as defined, with its kind."""
    found = {}
    for node in ast.walk(ast.parse(Path(metrics.__file__).read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in KINDS and node.args
                and isinstance(node.args[0], ast.Constant)):
            found[str(node.args[0].value)] = KINDS[node.func.id]
    return found


def exported_names(name: str, kind: str) -> set[str]:
    base = f"ray_{name}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


def all_exported_names() -> dict[str, str]:
    """Every exported series name, with the defined metric it comes from."""
    return {exported: name for name, kind in defined_metrics().items()
            for exported in exported_names(name, kind)}
