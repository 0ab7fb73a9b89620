"""Every environment variable the gateway reads, in one place.

Secrets (upstream API keys, the ingress's accepted keys) are named in the config and read
here, never stored in `serve_config.yaml` itself.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

CACHE_DIR_ENV = "SERVE_APP_CACHE_DIR"
_WHITESPACE = re.compile(r"\s")


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
    """The ingress's accepted keys: comma-separated in the variable, one per line in the file.
    Naming a source that holds no key is an error, never an open door."""
    keys: list[str] = []
    if env_var:
        keys += _env_keys(env_var, os.environ.get(env_var, ""))
    if path:
        try:
            text = Path(path).expanduser().read_text()
        except OSError as exc:
            raise ValueError(f"auth.api_keys_file cannot be read ({type(exc).__name__})") from None
        keys += _file_keys(text)
    if (env_var or path) and not keys:
        raise ValueError("auth names an API key source that holds no key")
    return tuple(dict.fromkeys(keys))


def _env_keys(env_var: str, value: str) -> list[str]:
    """Keys between commas, stripped; empty items are skipped. An item with whitespace
    inside is refused: a Bearer token has none, and `sk-a sk-b` is ambiguous (two keys, or a
    comma forgotten?), so it stops the start rather than accept a guess."""
    keys = []
    for number, item in enumerate(value.split(","), start=1):
        key = item.strip()
        if _WHITESPACE.search(key):
            raise ValueError(f"{env_var}: item {number} has whitespace inside a key; "
                             "separate keys with commas")
        if key:
            keys.append(key)
    return keys


def _file_keys(text: str) -> list[str]:
    """One key per line, stripped; blank lines and `#` comment lines are skipped. A line with
    whitespace inside is refused by number, never by content (it may hold a key), so that a
    stray note cannot turn its words into keys."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if _WHITESPACE.search(key):
            raise ValueError(f"auth.api_keys_file: line {number} has whitespace inside a key; "
                             "write one key per line, comments on lines of their own")
        keys.append(key)
    return keys

