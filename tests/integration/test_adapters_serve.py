"""PEFT-trained soft prompts served through the Serve graph: a gateway application whose
`model.adapters` names a PROMPT_TUNING and a P_TUNING folder that PEFT saved, asked through
the official OpenAI SDK, answers greedily exactly as `PeftModel.generate` does with the
cache off (with peft 0.21 and transformers 5, the cache on answers otherwise: checked
here too, so the day it agrees the docs can say so)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from tests.integration.conftest import ServeGraph, delete_app
from tests.peft_adapters import peft_greedy, peft_model
from tests.upstream_servers import ROOT

pytestmark = pytest.mark.integration

PROMPT_TUNED, P_TUNED = "demo-prompt-tuned", "demo-p-tuned"
LEAD_IN = "the quick"
MAX_TOKENS = 12


@dataclass
class AdaptedGateway:
    client: openai.OpenAI
    folders: dict[str, Path]


@pytest.fixture(scope="module")
def adapted_gateway(serve_graph: ServeGraph, prompt_tuning_dir: Path,
                    p_tuning_dir: Path) -> Iterator[AdaptedGateway]:
    """A second gateway under /adapted, serving both adapters beside the demo model."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [app] = [a for a in config["applications"] if a["name"] == "gateway"]
    args = dict(app["args"])
    [backend] = args["upstream"]["backends"]
    args["upstream"] = {**args["upstream"],
                        "backends": [{**backend, "url": f"{serve_graph.proxy.url}/v1"}]}
    folders = {PROMPT_TUNED: prompt_tuning_dir, P_TUNED: p_tuning_dir}
    args["model"] = {**(args.get("model") or {}), "adapters": [
        {"name": name, "path": str(path)} for name, path in folders.items()]}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    serve.run(built, name="adapted", route_prefix="/adapted")
    client = openai.OpenAI(base_url=f"{serve_graph.base_url}/adapted/v1", api_key="EMPTY",
                           max_retries=0)
    yield AdaptedGateway(client, folders)
    delete_app("adapted")


@pytest.mark.parametrize("name", [PROMPT_TUNED, P_TUNED])
def test_a_completion_is_pefts_greedy_answer(name: str, adapted_gateway: AdaptedGateway,
                                             demo_model_dir: Path, demo_tokenizer: Any) -> None:
    peft = peft_model(demo_model_dir, adapted_gateway.folders[name])
    ids = list(demo_tokenizer(LEAD_IN).input_ids)
    expected = peft_greedy(peft, ids, MAX_TOKENS)
    answer = adapted_gateway.client.completions.create(
        model=name, prompt=LEAD_IN, max_tokens=MAX_TOKENS, temperature=0, logprobs=0)
    assert answer.model == name
    assert answer.choices[0].logprobs is not None
    tokens = answer.choices[0].logprobs.tokens or []
    assert tokens == [demo_tokenizer.decode([i]) for i in expected]  # token for token
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == peft.peft_config["default"].num_virtual_tokens + len(
        ids)
    cached = peft_greedy(peft, ids, MAX_TOKENS, use_cache=True)
    assert cached != expected, "PEFT's generate with the cache on now agrees: say so in docs"


@pytest.mark.parametrize("name", [PROMPT_TUNED, P_TUNED])
def test_a_chat_is_pefts_greedy_answer_on_the_templated_conversation(
        name: str, adapted_gateway: AdaptedGateway, demo_model_dir: Path,
        demo_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Tell me about Japan."}]
    ids = list(demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
               .input_ids)
    expected = peft_greedy(peft_model(demo_model_dir, adapted_gateway.folders[name]), ids,
                           MAX_TOKENS)
    stream = adapted_gateway.client.chat.completions.create(
        model=name, messages=messages,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert {chunk.model for chunk in chunks} == {name}
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == demo_tokenizer.decode(expected, skip_special_tokens=True)


def test_models_list_the_adapters_and_unknown_names_are_404(
        adapted_gateway: AdaptedGateway, serve_graph: ServeGraph) -> None:
    client = adapted_gateway.client
    parents = {model.id: getattr(model, "parent", None) for model in client.models.list()}
    assert parents[PROMPT_TUNED] == parents[P_TUNED] == serve_graph.model
    assert parents[serve_graph.model] is None
    assert getattr(client.models.retrieve(P_TUNED), "parent", None) == serve_graph.model
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="demo-untuned", prompt="x", max_tokens=1)
