"""A canary in prompts, chat messages, template variables, dropped and refused fields,
error-provoking requests, `user` and unknown model names never appears upstream, in any file
Ray writes for the session (Serve's and the gateway's access logs included), in the metrics
(the gateway's own series and their labels included), or in an error returned to another
request. Neither do a keyed gateway's API keys, their tenants' digests, nor its transform
key."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

CANARY = "CANARY-e41d-private-words"


def send_canaries(client: openai.OpenAI, base_url: str, model: str) -> list[str]:
    """Requests carrying the canary; returns the error messages they were answered with."""
    client.completions.create(model=model, prompt=f"{CANARY} Tell me about France",
                              max_tokens=4, user=CANARY)
    list(client.completions.create(model=model, prompt=[CANARY, "France"], max_tokens=4,
                                   stream=True))
    client.chat.completions.create(model=model, max_tokens=4, user=CANARY, messages=[
        {"role": "system", "content": CANARY}, {"role": "user", "content": CANARY}])
    client.embeddings.create(model="serve-app-demo-embed", input=[CANARY], user=CANARY)
    # Fields that carry text and are dropped on the way: never forwarded.
    client.chat.completions.create(model=model, max_tokens=4, metadata={"note": CANARY},
                                   extra_body={"safety_identifier": CANARY,
                                               "prompt_cache_key": CANARY,
                                               "chat_template_kwargs": {"note": CANARY}},
                                   messages=[{"role": "user", "content": CANARY,
                                              "name": "canary"}])
    errors = []
    bad_requests = [
        lambda: client.completions.create(model=model, prompt=CANARY * 100, max_tokens=500),
        lambda: client.completions.create(model=model, prompt=CANARY, suffix=CANARY),
        lambda: client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": CANARY}], tools=[{"type": "function",
                                                          "function": {"name": "f"}}]),
        lambda: client.chat.completions.create(model=model, messages=[{"role": "user",
            "content": [{"type": "prompt_embeds", "data": CANARY}]}]),
        lambda: client.embeddings.create(model="serve-app-demo-embed",
                                         input=CANARY + " x" * 300),
        # Unknown and refused fields: a 400 that names the field, never its text.
        lambda: client.completions.create(model=model, prompt="France", max_tokens=4,
                                          extra_body={"messages": [CANARY],
                                                      "made_up": CANARY}),
        lambda: client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "x"}], extra_body={"documents": [{"text": CANARY}]}),
        lambda: client.chat.completions.create(model=model, messages=[
            {"role": "user", "content": "x"}], response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "description": CANARY}}}),
        lambda: client.completions.create(model=model, prompt="x" * 20_000 + CANARY),
    ]
    for call in bad_requests:
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        errors.append(str(caught.value.body))
    broken = b'{"prompt": "' + CANARY.encode()
    raw = httpx.post(f"{base_url}/v1/completions", content=broken,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400
    errors.append(raw.text)
    raw = httpx.post(f"{base_url}/v1/completions", content=broken)  # not declared JSON
    assert raw.status_code == 415
    errors.append(raw.text)
    # A model name the gateway does not serve: answered 404 (naming it back to its sender is
    # fine), but never a metric's `model` label nor a log word.
    raw = httpx.post(f"{base_url}/v1/completions", json={"model": CANARY, "prompt": "x"})
    assert raw.status_code == 404
    return errors


def test_canary_goes_nowhere(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    import ray._private.worker as worker

    before = len(serve_graph.proxy.bodies)
    errors = send_canaries(client, serve_graph.base_url, serve_graph.model)
    # Errors answer with what was wrong, never with the request's text.
    for message in errors:
        assert CANARY not in message
    for body in serve_graph.proxy.bodies[before:]:
        assert CANARY.encode() not in body

    node = worker._global_node
    time.sleep(3)  # let workers flush their log files
    logs = Path(node.get_session_dir_path())
    scanned = 0
    for path in logs.rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            assert CANARY.encode() not in path.read_bytes(), path
    assert scanned > 10  # the session's logs were really there to scan
    access_logs = [p for p in (logs / "logs" / "serve").glob("*.log")]
    assert any(b"/v1/completions" in p.read_bytes() for p in access_logs)  # requests logged
    metrics = scrape_with(f"http://127.0.0.1:{node.metrics_export_port}/metrics", OUR_SERIES)
    assert "ray_serve_num_http_requests_total" in metrics  # Serve's metrics, live
    assert CANARY not in metrics


def test_api_keys_tenants_and_the_transform_key_go_nowhere(  # type: ignore[no-untyped-def]
    keyed_gateway, serve_graph,
) -> None:
    """Requests under each key of a keyed gateway, good and refused, with the canary in
    them: the keys, the tenants the Gateway derives from them and carries to the Embedder,
    and the transform's key appear in no upstream body, answer, log file or metric."""
    import ray._private.worker as worker

    from serve_app.prompts.tenants import api_key_tenant
    from tests.integration.conftest import TRANSFORM_KEY

    before = len(serve_graph.proxy.bodies)
    answers = []
    for key in keyed_gateway.api_keys:
        openai_client = openai.OpenAI(base_url=f"{keyed_gateway.url}/v1", api_key=key,
                                      max_retries=0)
        openai_client.completions.create(model=serve_graph.model, prompt=f"{CANARY} France",
                                         max_tokens=4, user=CANARY)
        list(openai_client.chat.completions.create(
            model=serve_graph.model, max_tokens=4, stream=True,
            messages=[{"role": "user", "content": CANARY}]))
        with pytest.raises(openai.BadRequestError) as refused:
            openai_client.completions.create(model=serve_graph.model, prompt=CANARY,
                                             suffix=CANARY)
        answers.append(str(refused.value.body))
        privacy = httpx.get(f"{keyed_gateway.url}/health/privacy", timeout=10,
                            headers={"authorization": f"Bearer {key}"})
        answers.append(privacy.text)
    wrong = httpx.post(f"{keyed_gateway.url}/v1/completions", timeout=10,
                       headers={"authorization": f"Bearer {keyed_gateway.api_keys[0]}x"},
                       json={"model": serve_graph.model, "prompt": CANARY})
    assert wrong.status_code == 401
    answers.append(wrong.text)
    secrets = [CANARY, TRANSFORM_KEY, *keyed_gateway.api_keys,
               *(api_key_tenant(key) for key in keyed_gateway.api_keys)]
    for secret in secrets:
        assert not [text for text in answers if secret in text], secret
        assert not [body for body in serve_graph.proxy.bodies[before:]
                    if secret.encode() in body], secret

    node = worker._global_node
    time.sleep(3)  # let workers flush their log files
    scanned = 0
    for path in Path(node.get_session_dir_path()).rglob("*"):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            content = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in content, (path, secret)
    assert scanned > 10
    metrics = scrape_with(f"http://127.0.0.1:{node.metrics_export_port}/metrics", OUR_SERIES)
    assert not [secret for secret in secrets if secret in metrics]


# The gateway's own series that the canaries move, one per stage: the scan waits for them,
# so it covers their labels (route, model, status, reason, backend).
OUR_SERIES = ("ray_serve_app_requests_total", "ray_serve_app_rejections_total",
              "ray_serve_app_embedder_payload_bytes_total",
              "ray_serve_app_upstream_requests_total")


def scrape_with(url: str, names: tuple[str, ...], timeout_s: float = 60.0) -> str:
    """The metrics text once it has every one of `names` (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(url, timeout=10).text
        missing = [name for name in names if name not in text]
        if not missing:
            return text
        assert time.monotonic() < deadline, f"never exported: {missing}"
        time.sleep(0.5)
