"""A gateway deployed with `keyed_gaussian` and two API keys through Serve: its Embedder
replica transforms what reaches the upstream (a tenant's shared prefixes byte-identical,
the rest not), each API key is a tenant whose rows no other key's requests reproduce, the
client-side encoder given the key's tenant sends the same bytes, `/health` says nothing of
the transform and `/health/privacy` needs a key, and the transform's key is in no file Ray
writes, no metric and no answer."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import httpx
import pytest
import torch

from serve_app.client import PromptEncoder
from serve_app.config import TransformConfig
from serve_app.prompts.tenants import api_key_tenant
from tests.integration.conftest import (
    TRANSFORM_KEY,
    TRANSFORM_KEY_ENV,
    KeyedGateway,
    ServeGraph,
)

pytestmark = pytest.mark.integration

PREFIX = "The capital of France is Paris. "


def upstream_rows(bodies: list[bytes]) -> list[torch.Tensor]:
    rows = []
    for body in bodies:
        data = json.loads(body)["prompt_embeds"]
        rows.append(torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True))
    return rows


def complete(gateway: KeyedGateway, serve_graph: ServeGraph, api_key: str,
             prompt: str) -> torch.Tensor:
    """The rows the upstream received for one request under `api_key`."""
    before = len(serve_graph.proxy.bodies)
    answer = httpx.post(f"{gateway.url}/v1/completions", timeout=60,
                        headers={"authorization": f"Bearer {api_key}"},
                        json={"model": serve_graph.model, "prompt": prompt, "max_tokens": 2,
                              "temperature": 0})
    assert answer.status_code == 200, answer.text
    [rows] = upstream_rows(serve_graph.proxy.bodies[before:])
    return rows


def test_the_embedder_replica_sends_keyed_rows(keyed_gateway: KeyedGateway,
                                               serve_graph: ServeGraph,
                                               demo_tokenizer, demo_causal_lm) -> None:  # type: ignore[no-untyped-def]
    key = keyed_gateway.api_keys[0]
    seine, rome, seine_again = (
        complete(keyed_gateway, serve_graph, key, PREFIX + suffix)
        for suffix in ("Its river is the Seine.", "Rome is in Italy.", "Its river is the Seine."))
    shared = len(demo_tokenizer(PREFIX + "R").input_ids) - 1
    assert seine[:shared].numpy().tobytes() == rome[:shared].numpy().tobytes()
    assert (seine[shared:shared + 5] != rome[shared:shared + 5]).any(dim=1).all()
    assert torch.equal(seine, seine_again)
    ids = torch.tensor(demo_tokenizer(PREFIX + "Its river is the Seine.").input_ids)
    raw = demo_causal_lm.get_input_embeddings()(ids).detach()
    assert (seine != raw).any(dim=1).all()  # every row is moved off the matrix's own row


def test_each_api_key_is_a_tenant_and_the_client_encoder_matches_its_rows(
    keyed_gateway: KeyedGateway, serve_graph: ServeGraph, demo_model_dir: Path,
) -> None:
    """A key's rows are the ones its own client-side encoder makes, byte for byte, and
    another key's requests share none of them."""
    prompt = PREFIX + "Its river is the Seine."
    one, two = (complete(keyed_gateway, serve_graph, key, prompt)
                for key in keyed_gateway.api_keys)
    assert one.shape == two.shape and (one != two).any(dim=1).all()
    config = TransformConfig(kind="keyed_gaussian", sigma=keyed_gateway.sigma,
                             key_env=TRANSFORM_KEY_ENV)
    for key, sent in zip(keyed_gateway.api_keys, (one, two), strict=True):
        encoder = PromptEncoder.from_pretrained(demo_model_dir, config,
                                                tenant=api_key_tenant(key))
        rows = torch.load(io.BytesIO(base64.b64decode(encoder.encode(prompt))),
                          weights_only=True)
        assert rows.numpy().tobytes() == sent.numpy().tobytes()


def test_health_is_silent_privacy_needs_a_key_and_the_key_goes_nowhere(
    keyed_gateway: KeyedGateway, serve_graph: ServeGraph,
) -> None:
    import ray._private.worker as worker

    health = httpx.get(f"{keyed_gateway.url}/health", timeout=10)
    assert health.json() == {"status": "ok"}
    denied = httpx.get(f"{keyed_gateway.url}/health/privacy", timeout=10)
    assert denied.status_code == 401 and "sigma" not in denied.text
    privacy = httpx.get(f"{keyed_gateway.url}/health/privacy", timeout=10, headers={
        "authorization": f"Bearer {keyed_gateway.api_keys[1]}"}).json()
    assert privacy == {"transform": {"kind": "keyed_gaussian", "sigma": 2.0,
                                     "apply_to_client_embeds": False}, "tenant": "api_key"}
    error = httpx.post(f"{keyed_gateway.url}/v1/completions", timeout=10,
                       headers={"authorization": f"Bearer {keyed_gateway.api_keys[0]}"},
                       json={"model": serve_graph.model, "prompt": "x", "max_tokens": -1})
    assert error.status_code == 400
    answers = [health.text, denied.text, json.dumps(privacy), error.text]
    node = worker._global_node
    metrics = httpx.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10)
    answers.append(metrics.text)
    time.sleep(3)  # let workers flush their log files
    key = TRANSFORM_KEY.encode()
    scanned = 0
    for path in Path(node.get_session_dir_path()).rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            assert key not in path.read_bytes(), path
    assert scanned > 10
    serve_logs = b"".join(p.read_bytes() for p in
                          (Path(node.get_session_dir_path()) / "logs" / "serve").glob("*.log"))
    assert b"privacy.transform: {'kind': 'keyed_gaussian', 'sigma': 2.0" in serve_logs
    assert not [text for text in answers if TRANSFORM_KEY in text]
    assert not [body for body in serve_graph.proxy.bodies if key in body]
