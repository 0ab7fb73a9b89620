"""Tenants: whose prompts a keyed transform keeps apart.

Keyed rows depend on the prompt's tenant (`keyed_noise`), so one tenant's requests never
reproduce another's rows, and the chosen-prefix attack (growing a guessed prefix until
its rows equal a victim's) reaches only the attacker's own tenant. Under
`privacy.transform.tenant: api_key` each accepted API key is a tenant, named by a digest
of the key (never the key itself); with no `auth` configured, or under `shared`, every
client is the one `SHARED_TENANT`.
"""

from __future__ import annotations

import hashlib

SHARED_TENANT = "shared"
"""The tenant of every client where clients are not told apart."""


def api_key_tenant(api_key: str | bytes) -> str:
    """The tenant of the clients holding `api_key`: a digest of it, safe to carry between
    replicas (it does not give the key back)."""
    raw = api_key.encode() if isinstance(api_key, str) else api_key
    return "key:" + hashlib.blake2b(raw, digest_size=16, person=b"serveapp.tenant").hexdigest()
