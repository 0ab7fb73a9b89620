"""Tenants under a keyed transform: the key check names each request's tenant (a digest of
the matched API key), the Embedder's rows depend on it, one tenant's rows never reproduce
another's, the prefix-routing key follows the tenant, and no API key goes anywhere."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from serve_app.api.completions import CompletionsService
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, ModelConfig, RoutingConfig, TransformConfig
from serve_app.prompts.embedder import EmbedderCore, PromptInput
from serve_app.prompts.prefix import prefix_hashes, prefix_key
from serve_app.prompts.tenants import SHARED_TENANT, api_key_tenant
from serve_app.upstream.call import UpstreamCall, UpstreamReply
from tests.unit.conftest import UPSTREAM
from tests.unit.gateway_client import FRANCE, GREEDY, GatewayFactory, RecordingASGITransport

KEY_ENV = "SERVE_APP_TEST_TENANT_TRANSFORM_KEY"
TRANSFORM_KEY = "tenant-test-transform-key-0123"
API_KEYS = ("sk-tenant-one-8f2c1e", "sk-tenant-two-4b9d07")


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> TransformConfig:
    monkeypatch.setenv(KEY_ENV, TRANSFORM_KEY)
    return TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV)


@pytest.fixture
def keyed_core(demo_model_dir: Path, keyed: TransformConfig) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(), keyed)


def sent_rows(recorder: RecordingASGITransport) -> list[torch.Tensor]:
    rows = [torch.load(io.BytesIO(base64.b64decode(json.loads(body)["prompt_embeds"])),
                       weights_only=True) for body in recorder.bodies]
    recorder.bodies.clear()
    return rows


async def rows_under(gateway: httpx.AsyncClient, recorder: RecordingASGITransport,
                     key: str | None, prompt: str = FRANCE) -> torch.Tensor:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = await gateway.post("/v1/completions", headers=headers,
                                  json={"model": "serve-app-demo", "prompt": prompt, **GREEDY})
    assert response.status_code == 200, response.text
    [rows] = sent_rows(recorder)
    return rows


def every_row_differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a != b).any(dim=1).all())


async def test_each_api_key_is_a_tenant_of_its_own(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
    keyed_core: EmbedderCore, keyed: TransformConfig, demo_tokenizer: Any,
) -> None:
    gateway = make_gateway(recorder, api_keys=API_KEYS, core=keyed_core,
                           privacy={"transform": keyed})
    one, two = [await rows_under(gateway, recorder, key) for key in API_KEYS]
    assert every_row_differs(one, two)
    assert torch.equal(await rows_under(gateway, recorder, API_KEYS[0]), one)
    # The rows are the Embedder's for the matched key's tenant (the second key's, not the
    # first's), which a client that knows its key computes too.
    ids = list(demo_tokenizer(FRANCE).input_ids)
    [expected] = keyed_core.rows([ids], [api_key_tenant(API_KEYS[1])])
    assert torch.equal(two, expected)
    [shared] = keyed_core.rows([ids])
    assert every_row_differs(one, shared) and every_row_differs(two, shared)


async def test_shared_tenancy_and_no_auth_put_every_client_in_one_tenant(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
    keyed_core: EmbedderCore, keyed: TransformConfig, demo_tokenizer: Any,
) -> None:
    shared = keyed.model_copy(update={"tenant": "shared"})
    gateway = make_gateway(recorder, api_keys=API_KEYS, core=keyed_core,
                           privacy={"transform": shared})
    one, two = [await rows_under(gateway, recorder, key) for key in API_KEYS]
    assert torch.equal(one, two)
    open_gateway = make_gateway(recorder, core=keyed_core, privacy={"transform": keyed})
    assert torch.equal(await rows_under(open_gateway, recorder, None), one)
    [expected] = keyed_core.rows([list(demo_tokenizer(FRANCE).input_ids)], [SHARED_TENANT])
    assert torch.equal(one, expected)


def test_a_batch_mixes_tenants_row_for_row(keyed_core: EmbedderCore) -> None:
    """The Embedder batches prompts of different tenants: each prompt's rows are those it
    gets alone under its own tenant."""
    prompts = [[0, 5, 6, 7, 8], [0, 5, 6, 7, 8], [0, 9, 10]]
    tenants = [api_key_tenant(API_KEYS[0]), api_key_tenant(API_KEYS[1]), SHARED_TENANT]
    batched = keyed_core.rows(prompts, tenants)
    for prompt, tenant, rows in zip(prompts, tenants, batched, strict=True):
        assert torch.equal(keyed_core.rows([prompt], [tenant])[0], rows)
    assert every_row_differs(batched[0], batched[1])
    with pytest.raises(ValueError, match="one tenant per prompt"):
        keyed_core.rows(prompts, tenants[:2])


def test_the_tenant_is_a_digest_of_the_key() -> None:
    tenant = api_key_tenant(API_KEYS[0])
    assert tenant == api_key_tenant(API_KEYS[0].encode()) != api_key_tenant(API_KEYS[1])
    assert API_KEYS[0] not in tenant and tenant != SHARED_TENANT


async def test_no_api_key_reaches_the_upstream_a_log_or_an_answer(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
    keyed_core: EmbedderCore, keyed: TransformConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = make_gateway(recorder, api_keys=API_KEYS, core=keyed_core,
                           privacy={"transform": keyed})
    headers = {"authorization": f"Bearer {API_KEYS[0]}"}
    answers = [await gateway.post("/v1/completions", headers=headers, json={
        "model": "serve-app-demo", "prompt": FRANCE, **GREEDY})]
    answers.append(await gateway.post("/v1/completions", headers=headers, json={
        "model": "serve-app-demo", "prompt": FRANCE, "max_tokens": -1}))
    answers.append(await gateway.get("/health/privacy", headers=headers))
    seen = [answer.text for answer in answers] + [r.getMessage() for r in caplog.records]
    seen += [body.decode() for body in recorder.bodies]
    seen += [str(h) for h in recorder.headers]
    for secret in (*API_KEYS, api_key_tenant(API_KEYS[0]), TRANSFORM_KEY):
        assert not [text for text in seen if secret in text], secret


# ----------------------------------------------------------------- routing by tenant


def test_the_prefix_key_names_the_tenant_when_given() -> None:
    ids = list(range(100, 140))
    one, two = api_key_tenant(API_KEYS[0]), api_key_tenant(API_KEYS[1])
    assert prefix_key([ids], 16, 2, one) == prefix_key([ids[:32] + [7]], 16, 2, one)
    assert len({prefix_key([ids], 16, 2, one), prefix_key([ids], 16, 2, two),
                prefix_key([ids], 16, 2)}) == 3
    # Under a tenant the chain still extends the shorter prompt's chain.
    assert prefix_hashes(ids, 8, 4, one)[:2] == prefix_hashes(ids[:16], 8, 4, one)


class CallRecorder:
    """A `Pipeline` that keeps each call and tenant and answers 200."""

    def __init__(self) -> None:
        self.calls: list[tuple[UpstreamCall, str]] = []

    async def complete(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                       tenant: str) -> UpstreamReply:
        self.calls.append((call, tenant))
        return UpstreamReply(200, b"{}")

    async def open_stream(self, call: UpstreamCall, prompts: Sequence[PromptInput],
                          tenant: str) -> Any:
        raise AssertionError("not streamed here")

    async def upstream_status(self) -> list[dict[str, Any]]:
        return []


@pytest.mark.parametrize(("kind", "tenant_mode", "keys_differ"), [
    ("keyed_gaussian", "api_key", True), ("keyed_gaussian", "shared", False),
    ("gaussian", "api_key", False), ("none", "api_key", False),
])
async def test_requests_route_by_tenant_only_where_their_rows_differ(
    demo_model_dir: Path, keyed: TransformConfig, kind: str, tenant_mode: str,
    keys_differ: bool,
) -> None:
    """Keyed rows differ by tenant, so does their cache and so their routing key; other
    kinds' rows (and caches) are every tenant's, and so is their key."""
    transform = keyed.model_copy(update={"kind": kind, "tenant": tenant_mode})
    config = AppConfig(upstream=UPSTREAM.model_copy(update={"routing": RoutingConfig(
        block_size=4, prefix_blocks=2)}), privacy={"transform": transform})
    pipeline = CallRecorder()
    service = CompletionsService(ServedModel.from_config(config, pipeline))
    body = json.dumps({"model": "serve-app-demo", "prompt": FRANCE, **GREEDY}).encode()
    for key in API_KEYS:
        response = await service.create_completion(body, api_key_tenant(key))
        assert response.status_code == 200
    (first, one), (second, two) = pipeline.calls
    assert first.prefix_key is not None
    assert (first.prefix_key != second.prefix_key) is keys_differ
    expected = [api_key_tenant(k) for k in API_KEYS] if tenant_mode == "api_key" else [
        SHARED_TENANT] * 2
    assert [one, two] == expected
