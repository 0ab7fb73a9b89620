"""A changed `model.adapters` applied in place, as Serve applies a `user_config`: the
Embedder's core and deployment keep unchanged adapters, read new ones and drop removed
ones; a refused folder leaves the served set as it was; the ingress lists and accepts the
new set; and a request naming an adapter its Embedder does not hold fails alone."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from serve_app.api.app import create_gateway_app
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import AdapterConfig, AppConfig, ModelConfig
from serve_app.deployments import Embedder
from serve_app.errors import GatewayError
from serve_app.prompts.adapters import AdapterError
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore, EmbedRequest
from serve_app.sentence.service import SentenceService
from serve_app.upstream.dispatcher import DispatcherCore
from tests.unit.conftest import UPSTREAM
from tests.unit.gateway_client import MODEL, RecordingASGITransport, error_of, ok

FIRST, SECOND = "tuned-a", "tuned-b"


def saved_rows(folder: Path) -> torch.Tensor:
    return load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.fixture(scope="module")
def first(prompt_tuning_dir: Path) -> AdapterConfig:
    return AdapterConfig(name=FIRST, path=str(prompt_tuning_dir))


@pytest.fixture(scope="module")
def second(p_tuning_dir: Path) -> AdapterConfig:
    return AdapterConfig(name=SECOND, path=str(p_tuning_dir))


@pytest.fixture
def broken(prompt_tuning_dir: Path, tmp_path: Path) -> AdapterConfig:
    """An adapter folder whose weights file is gone."""
    folder = tmp_path / "broken"
    shutil.copytree(prompt_tuning_dir, folder)
    (folder / "adapter_model.safetensors").unlink()
    return AdapterConfig(name="broken", path=str(folder))


@pytest.fixture
def core(demo_model_dir: Path, first: AdapterConfig) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(adapters=[first]))


@pytest.fixture(scope="module")
def ids(demo_tokenizer: Any) -> list[int]:
    return list(demo_tokenizer("Tell me about Japan.").input_ids)


# ------------------------------------------------------------------------ the core


def test_a_changed_list_keeps_unchanged_adapters_and_reads_new_ones(
        core: EmbedderCore, first: AdapterConfig, second: AdapterConfig,
        p_tuning_dir: Path, ids: list[int]) -> None:
    loaded = core.adapters[FIRST]
    core.set_adapters([first, second])
    assert set(core.adapters) == {FIRST, SECOND}
    assert core.adapters[FIRST] is loaded  # not read again
    [plain, led] = core.rows([ids, ids], adapters=[None, SECOND])
    assert torch.equal(led, torch.cat([saved_rows(p_tuning_dir).to(core.dtype), plain]))


def test_a_removed_adapter_is_dropped(core: EmbedderCore, second: AdapterConfig) -> None:
    core.set_adapters([second])
    assert set(core.adapters) == {SECOND}
    with pytest.raises(ValueError, match=f"no prompt adapter named {FIRST}"):
        core.rows([[1, 2]], adapters=[FIRST])


def test_an_adapter_given_a_new_folder_is_read_from_it(
        core: EmbedderCore, p_tuning_dir: Path, prompt_tuning_dir: Path) -> None:
    core.set_adapters([AdapterConfig(name=FIRST, path=str(p_tuning_dir))])
    rows = core.adapters[FIRST].rows
    assert torch.equal(rows, saved_rows(p_tuning_dir).to(core.dtype))
    assert rows.shape != saved_rows(prompt_tuning_dir).shape


def test_a_refused_folder_leaves_the_served_set_as_it_was(
        core: EmbedderCore, first: AdapterConfig, second: AdapterConfig,
        broken: AdapterConfig) -> None:
    served = core.adapters
    with pytest.raises(AdapterError, match="'broken'.*no adapter_model.safetensors"):
        core.set_adapters([second, broken])
    assert core.adapters is served and set(served) == {FIRST}


def test_a_name_given_twice_is_refused(core: EmbedderCore, first: AdapterConfig,
                                       second: AdapterConfig) -> None:
    with pytest.raises(ValueError, match=f"unique: {FIRST}"):
        core.set_adapters([first, AdapterConfig(name=FIRST, path=second.path)])
    assert set(core.adapters) == {FIRST}


def test_an_unknown_adapter_fails_its_request_alone(core: EmbedderCore,
                                                    ids: list[int]) -> None:
    requests = [EmbedRequest((ids,)), EmbedRequest((ids, ids), adapter="gone"),
                EmbedRequest((ids,), adapter=FIRST)]
    answers, _ = core.embed_requests(requests, max_prompts=2)
    plain, refused, led = answers
    assert isinstance(refused, GatewayError)
    assert (refused.status, refused.code, refused.param) == (503, "adapter_not_loaded", "model")
    assert "`gone`" in refused.message and refused.headers == {"Retry-After": "1"}
    [expected_plain, expected_led] = core.rows([ids, ids], adapters=[None, FIRST])
    assert not isinstance(plain, GatewayError) and not isinstance(led, GatewayError)
    assert [item.data for item in plain] == [encode_prompt_embeds(expected_plain).data]
    assert [item.data for item in led] == [encode_prompt_embeds(expected_led).data]


# ------------------------------------------------------------------------ the deployment


@pytest.fixture(autouse=True)
def replica_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replica context `@serve.batch` reads (its request cap, its metrics' tags), and
    a batch queue of this test's event loop: Serve makes one per method and process, on
    the loop of its first call, as a replica has one loop."""
    lazy_queue = Embedder.func_or_class._batched.set_max_batch_size.__self__
    monkeypatch.setattr(lazy_queue, "_queue", None)
    from ray.serve import context
    from ray.serve._private.common import DeploymentID, ReplicaID
    from ray.serve._private.config import DeploymentConfig

    monkeypatch.setattr(context, "_INTERNAL_REPLICA_CONTEXT", context.ReplicaContext(
        replica_id=ReplicaID("unit", DeploymentID("Embedder", "gateway")),
        servable_object=None, _deployment_config=DeploymentConfig(max_ongoing_requests=64),
        rank=None, world_size=1))


def _replica(demo_model_dir: Path, first: AdapterConfig) -> Any:
    """The Embedder deployment's class in this process, as a Serve replica runs it."""
    config = AppConfig(model=ModelConfig(adapters=[first])).model_dump(mode="json")
    return Embedder.func_or_class(config)


def _user_config(*adapters: AdapterConfig) -> dict[str, Any]:
    # A batch waits for the requests sent together, so they share it.
    return {"max_batch_size": 8, "batch_wait_timeout_s": 0.2,
            "adapters": [adapter.model_dump(mode="json") for adapter in adapters]}


def _record_batches(replica: Any) -> list[int]:
    """The size of each batch the replica's core looks up."""
    sizes: list[int] = []
    embed_requests = replica.core.embed_requests

    def recorded(requests: Sequence[EmbedRequest], max_prompts: int) -> Any:
        sizes.append(len(requests))
        return embed_requests(requests, max_prompts)

    replica.core.embed_requests = recorded
    return sizes


async def test_the_embedder_applies_a_changed_list_in_place(
        demo_model_dir: Path, first: AdapterConfig, second: AdapterConfig,
        ids: list[int]) -> None:
    replica = _replica(demo_model_dir, first)
    await replica.reconfigure(_user_config(first))
    loaded = replica.core.adapters[FIRST]
    await replica.reconfigure(_user_config(first, second))
    assert replica.core.adapters[FIRST] is loaded
    [led] = await replica.embed(EmbedRequest((ids,), adapter=SECOND))
    assert led.rows == replica.core.adapters[SECOND].virtual_tokens + len(ids)
    await replica.reconfigure(_user_config(second))
    with pytest.raises(GatewayError, match=f"`{FIRST}`"):
        await replica.embed(EmbedRequest((ids,), adapter=FIRST))


async def test_a_batch_answers_its_requests_beside_one_naming_an_unknown_adapter(
        demo_model_dir: Path, first: AdapterConfig, ids: list[int]) -> None:
    replica = _replica(demo_model_dir, first)
    await replica.reconfigure(_user_config(first))
    batches = _record_batches(replica)
    answers = await asyncio.gather(
        replica.embed(EmbedRequest((ids,))),
        replica.embed(EmbedRequest((ids,), adapter="not-yet")),
        replica.embed(EmbedRequest((ids,), adapter=FIRST)),
        return_exceptions=True)
    assert batches == [3]  # one batch
    plain, refused, led = answers
    assert isinstance(refused, GatewayError) and refused.status == 503
    assert "`not-yet`" in refused.message
    assert not isinstance(plain, BaseException) and [p.rows for p in plain] == [len(ids)]
    assert not isinstance(led, BaseException)
    assert [p.rows for p in led] == [replica.core.adapters[FIRST].virtual_tokens + len(ids)]


async def test_a_running_embedder_keeps_its_adapters_when_a_folder_is_refused(
        demo_model_dir: Path, first: AdapterConfig, second: AdapterConfig,
        broken: AdapterConfig, ids: list[int], caplog: pytest.LogCaptureFixture) -> None:
    replica = _replica(demo_model_dir, first)
    await replica.reconfigure(_user_config(first))
    served = replica.core.adapters
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        await replica.reconfigure(_user_config(second, broken))  # Serve would stop it
    assert replica.core.adapters is served
    assert "'broken'" in caplog.text and "no adapter_model.safetensors" in caplog.text
    [led] = await replica.embed(EmbedRequest((ids,), adapter=FIRST))
    assert led.rows == served[FIRST].virtual_tokens + len(ids)
    assert replica.max_prompts == 8  # the batching of the same user_config applies


async def test_a_starting_embedder_refuses_a_refused_folder(
        demo_model_dir: Path, first: AdapterConfig, broken: AdapterConfig) -> None:
    replica = _replica(demo_model_dir, first)
    with pytest.raises(AdapterError, match="'broken'"):
        await replica.reconfigure(_user_config(first, broken))


async def test_an_embedder_override_without_adapters_serves_the_args_list(
        demo_model_dir: Path, first: AdapterConfig, second: AdapterConfig) -> None:
    """A `deployments:` override that sets batching alone keeps `args.model.adapters`."""
    replica = _replica(demo_model_dir, first)
    await replica.reconfigure(_user_config(first, second))
    await replica.reconfigure({"max_batch_size": 4})
    assert set(replica.core.adapters) == {FIRST}


# ------------------------------------------------------------------------ the ingress


@pytest.fixture
async def ingress(demo_model_dir: Path, first: AdapterConfig,
                  embeddings_service: SentenceService,
                  recorder: RecordingASGITransport) -> Any:
    """The ingress's served model (no adapters at start) over an Embedder core that holds
    `first`, and a client of its app."""
    core = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(adapters=[first]))
    dispatcher = DispatcherCore(UPSTREAM, httpx.AsyncClient(transport=recorder,
                                                            base_url="http://ref"))
    served = ServedModel.from_config(AppConfig(upstream=UPSTREAM),
                                     InProcessPipeline(core, dispatcher))
    embeddings = SentenceService(embeddings_service.models, embeddings_service.encoders,
                                 [served.served_name], served.limits)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(
        app=create_gateway_app(served, embeddings, ())), base_url="http://gateway")
    yield served, client
    await client.aclose()
    await dispatcher.aclose()


async def _listed(client: httpx.AsyncClient) -> dict[str, Any]:
    return {card["id"]: card for card in (await client.get("/v1/models")).json()["data"]}


async def test_the_ingress_lists_and_accepts_an_added_adapter(
        ingress: Any, first: AdapterConfig, demo_tokenizer: Any) -> None:
    served, client = ingress
    assert FIRST not in await _listed(client)
    served.set_adapters([first])
    assert (await _listed(client))[FIRST]["parent"] == MODEL
    answer = await ok(client, model=FIRST, prompt="Hi", max_tokens=2)
    assert answer["model"] == FIRST
    virtual = served.adapters[FIRST].virtual_tokens
    assert answer["usage"]["prompt_tokens"] == virtual + len(demo_tokenizer("Hi").input_ids)


async def test_the_ingress_refuses_a_removed_adapter(ingress: Any,
                                                     first: AdapterConfig) -> None:
    served, client = ingress
    served.set_adapters([first])
    served.set_adapters([])
    assert FIRST not in await _listed(client)
    response = await client.post("/v1/completions",
                                 json={"model": FIRST, "prompt": "Hi", "max_tokens": 2})
    assert error_of(response, 404)["code"] == "model_not_found"


async def test_the_ingress_keeps_its_set_when_a_folder_is_refused(
        ingress: Any, first: AdapterConfig, broken: AdapterConfig) -> None:
    served, client = ingress
    served.set_adapters([first])
    with pytest.raises(AdapterError, match="'broken'"):
        served.set_adapters([broken])
    listed = await _listed(client)
    assert FIRST in listed and "broken" not in listed


async def test_an_adapter_may_not_take_a_served_model_name(ingress: Any,
                                                           first: AdapterConfig) -> None:
    served, _ = ingress
    with pytest.raises(AdapterError, match="a served model's"):
        served.set_adapters([AdapterConfig(name=MODEL, path=first.path)])
    assert served.adapters == {}


async def test_an_adapter_the_embedder_does_not_hold_yet_fails_that_request_alone(
        ingress: Any, first: AdapterConfig, second: AdapterConfig) -> None:
    """The rollout's window: the ingress has the new list, its Embedder not yet."""
    served, client = ingress
    served.set_adapters([first, second])
    response = await client.post("/v1/completions",
                                 json={"model": SECOND, "prompt": "Hi", "max_tokens": 2})
    error = error_of(response, 503)
    assert error["code"] == "adapter_not_loaded" and f"`{SECOND}`" in error["message"]
    assert response.headers["retry-after"] == "1"
    assert (await ok(client, model=FIRST, prompt="Hi", max_tokens=2))["model"] == FIRST
