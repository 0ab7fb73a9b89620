"""Every environment variable the gateway reads, in one place.

Secrets (upstream API keys, the ingress's accepted keys) are named in the config and read
here, never stored in `serve_config.yaml` itself.
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


def api_keys(env_var: str | None, path: str | None) -> tuple[str, ...]:
    """The ingress's accepted keys: comma- or whitespace-separated in the variable, one per
    line in the file. Naming a source that holds no key is an error, never an open door."""
    keys: list[str] = []
    if env_var:
        keys += os.environ.get(env_var, "").replace(",", " ").split()
    if path:
        try:
            keys += Path(path).expanduser().read_text().split()
        except OSError as exc:
            raise ValueError(f"auth.api_keys_file cannot be read ({type(exc).__name__})") from None
    if (env_var or path) and not keys:
        raise ValueError("auth names an API key source that holds no key")
    return tuple(dict.fromkeys(keys))
