"""vLLM's prefix cache behind the gateway, read from vLLM's own /metrics.

vLLM keys each full block of a prompt-embeds prompt by a hash of its rows, so requests that
share a prefix share cached blocks only when the gateway sends them identical rows: with no
transform, and with `keyed_gaussian` (noise fixed by the key, the tenant and the prefix);
never with `gaussian` (fresh noise per request).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from serve_app.config import PrivacyConfig, TransformConfig
from tests.vllm.answers import MODEL
from tests.vllm.gateway import Gateway
from tests.vllm.server import TIER, VllmServer

pytestmark = TIER

REQUESTS = 20
SYSTEM_CHARS = 1000
"""The demo tokenizer is byte-level: a 1,000-character system prompt is 1,000 tokens."""
KEY_ENV = "SERVE_APP_VLLM_TIER_TRANSFORM_KEY"
TRANSFORMS = {
    "none": TransformConfig(),
    "keyed_gaussian": TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV),
    "gaussian": TransformConfig(kind="gaussian", sigma=1.0),
}


@pytest.fixture(scope="module", autouse=True)
def transform_key() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, "vllm-tier-key-3c81f2d09a")
        yield


def system_prompt(tag: str) -> str:
    """A prompt of its own per transform, so no arm hits blocks another one cached."""
    text = f"[{tag}] You are a careful assistant. Answer in one short sentence. "
    return (text * (SYSTEM_CHARS // len(text) + 1))[:SYSTEM_CHARS]


def settled_counters(server: VllmServer, queried_at_least: float,
                     timeout_s: float = 20.0) -> tuple[float, float]:
    """The counters once they count every request: vLLM updates them as it logs each
    engine step, which may come after the last answer reached the client."""
    deadline = time.monotonic() + timeout_s
    while True:
        queries, hits = server.prefix_cache()
        if queries >= queried_at_least or time.monotonic() > deadline:
            return queries, hits
        time.sleep(0.2)


@pytest.mark.parametrize("kind", list(TRANSFORMS))
def test_shared_system_prompt_hits_vllms_prefix_cache(
        kind: str, start_gateway: Callable[..., Gateway], vllm_server: VllmServer) -> None:
    client = start_gateway(privacy=PrivacyConfig(transform=TRANSFORMS[kind])).client()
    system = system_prompt(kind)
    queries_before, hits_before = vllm_server.prefix_cache()
    for index in range(REQUESTS):
        client.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {index}: what is the capital of France?"}])
    queries, hits = settled_counters(vllm_server,
                                     queries_before + REQUESTS * SYSTEM_CHARS)
    queried, hit = queries - queries_before, hits - hits_before
    assert queried >= REQUESTS * SYSTEM_CHARS, "vLLM counted fewer prompt tokens than it got"
    if kind == "gaussian":
        assert hit == 0, f"fresh noise per request, yet {hit:.0f} tokens hit the cache"
    else:
        # Every request after the first finds the system prompt's full blocks cached
        # (vLLM's blocks are 16 tokens here, 64 at most; the template adds a few tokens).
        assert hit >= (REQUESTS - 1) * (SYSTEM_CHARS - 64), (kind, queried, hit)
