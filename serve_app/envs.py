"""Every environment variable the gateway reads, in one place.

Secrets (upstream API keys) are named in the config and read here, never stored in
`serve_config.yaml` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "SERVE_APP_CACHE_DIR"


def cache_dir() -> Path:
    """Where locally built artefacts (the demo model) live; created on demand."""
    configured = os.environ.get(CACHE_DIR_ENV)
    base = Path(configured) if configured else Path.home() / ".cache" / "serve_app"
    return base.expanduser()


def secret(env_var: str | None) -> str | None:
    """The value of a secret-bearing environment variable, or None when unset or unnamed."""
    if not env_var:
        return None
    value = os.environ.get(env_var)
    return value or None
