"""The gateway's `AppConfig`, read out of a Serve config file as `serve run` deploys it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app.config import AppConfig

GATEWAY_IMPORT_PATH = "serve_app.deployments:build_app"


def _applications(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    applications = document.get("applications") if isinstance(document, dict) else None
    if not isinstance(applications, list) or not all(isinstance(a, dict) for a in applications):
        raise ValueError(f"{path} has no `applications` list")
    return applications


def read_app_config(path: Path, app: str | None = None) -> AppConfig:
    """The `args` of the gateway application named `app`, or of the one application whose
    import_path is the gateway's, validated as `AppConfig`."""
    applications = _applications(path)
    if app is not None:
        chosen = [a for a in applications if a.get("name") == app]
        if not chosen:
            raise ValueError(f"{path} has no application named {app!r}")
        if chosen[0].get("import_path") != GATEWAY_IMPORT_PATH:
            raise ValueError(f"application {app!r} of {path} is not the gateway "
                             f"(import_path {GATEWAY_IMPORT_PATH})")
    else:
        chosen = [a for a in applications if a.get("import_path") == GATEWAY_IMPORT_PATH]
        if len(chosen) != 1:
            raise ValueError(f"{path} has {len(chosen)} applications with import_path "
                             f"{GATEWAY_IMPORT_PATH}; name one with --app")
    return AppConfig.model_validate(chosen[0].get("args") or {})
