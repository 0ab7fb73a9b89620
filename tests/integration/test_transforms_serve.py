"""A gateway deployed with `keyed_gaussian` through Serve: its Embedder replica transforms
what reaches the upstream (shared prefixes byte-identical, the rest not), `/health` names
the transform, and the key is in no file Ray writes, no metric and no answer."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tests.integration.conftest import TRANSFORM_KEY, TRANSFORM_KEY_ENV, ServeGraph
from tests.upstream_servers import ROOT

pytestmark = pytest.mark.integration

PREFIX = "The capital of France is Paris. "


@pytest.fixture(scope="module")
def keyed_gateway(serve_graph: ServeGraph) -> Iterator[str]:
    """A second gateway application under /keyed, upstream through the recording proxy."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [app] = [a for a in config["applications"] if a["name"] == "gateway"]
    args = dict(app["args"])
    [backend] = args["upstream"]["backends"]
    args["upstream"] = {**args["upstream"],
                        "backends": [{**backend, "url": f"{serve_graph.proxy.url}/v1"}]}
    args["privacy"] = {"transform": {"kind": "keyed_gaussian", "sigma": 2.0,
                                     "key_env": TRANSFORM_KEY_ENV}}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    serve.run(built, name="keyed", route_prefix="/keyed")
    yield f"{serve_graph.base_url}/keyed"
    serve.delete("keyed")


def upstream_rows(bodies: list[bytes]) -> list[torch.Tensor]:
    rows = []
    for body in bodies:
        data = json.loads(body)["prompt_embeds"]
        rows.append(torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True))
    return rows


def test_the_embedder_replica_sends_keyed_rows(keyed_gateway: str, serve_graph: ServeGraph,
                                               demo_tokenizer, demo_causal_lm) -> None:  # type: ignore[no-untyped-def]
    before = len(serve_graph.proxy.bodies)
    prompts = [PREFIX + "Its river is the Seine.", PREFIX + "Rome is in Italy.",
               PREFIX + "Its river is the Seine."]
    for prompt in prompts:
        answer = httpx.post(f"{keyed_gateway}/v1/completions", timeout=60, json={
            "model": serve_graph.model, "prompt": prompt, "max_tokens": 2, "temperature": 0})
        assert answer.status_code == 200, answer.text
    seine, rome, seine_again = upstream_rows(serve_graph.proxy.bodies[before:])
    shared = len(demo_tokenizer(PREFIX + "R").input_ids) - 1
    assert seine[:shared].numpy().tobytes() == rome[:shared].numpy().tobytes()
    assert (seine[shared:shared + 5] != rome[shared:shared + 5]).any(dim=1).all()
    assert torch.equal(seine, seine_again)
    ids = torch.tensor(demo_tokenizer(prompts[0]).input_ids)
    raw = demo_causal_lm.get_input_embeddings()(ids).detach()
    assert (seine != raw).any(dim=1).all()  # every row is moved off the matrix's own row


def test_health_names_the_transform_and_the_key_goes_nowhere(
    keyed_gateway: str, serve_graph: ServeGraph,
) -> None:
    import ray._private.worker as worker

    health = httpx.get(f"{keyed_gateway}/health", timeout=10).json()
    assert health["privacy"]["transform"] == {"kind": "keyed_gaussian", "sigma": 2.0,
                                              "apply_to_client_embeds": False}
    error = httpx.post(f"{keyed_gateway}/v1/completions", timeout=10,
                       json={"model": serve_graph.model, "prompt": "x", "max_tokens": -1})
    assert error.status_code == 400
    answers = [json.dumps(health), error.text]
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
