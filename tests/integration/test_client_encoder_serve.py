"""The client-side encoder against the real Serve graph, through the official sync SDK: its
greedy answers are the text path's, and the upstream receives the same rows both ways."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from serve_app.client import SPELLINGS, PromptEncoder, Spelling, complete

pytestmark = pytest.mark.integration

PROMPT = "Tell me about France"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def encoder(demo_model_dir: Path) -> PromptEncoder:
    return PromptEncoder.from_pretrained(demo_model_dir)


def upstream_embeds(bodies: list[bytes]) -> list[str]:
    return [orjson.loads(body)["prompt_embeds"] for body in bodies]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_client_encoder_answers_equal_the_text_path(  # type: ignore[no-untyped-def]
    client: openai.OpenAI, serve_graph, encoder: PromptEncoder, spelling: Spelling,
) -> None:
    before = len(serve_graph.proxy.bodies)
    text = client.completions.create(model=serve_graph.model, prompt=PROMPT, temperature=0,
                                     max_tokens=16)
    embedded = complete(client, encoder, model=serve_graph.model, prompt=PROMPT,
                        spelling=spelling, temperature=0, max_tokens=16)
    assert text.choices[0].text
    assert embedded.choices[0].text == text.choices[0].text
    assert embedded.usage == text.usage
    by_text, by_client = upstream_embeds(serve_graph.proxy.bodies[before:])
    assert by_client == by_text == encoder.encode(PROMPT)

    before = len(serve_graph.proxy.bodies)
    chat = client.chat.completions.create(model=serve_graph.model, messages=MESSAGES,  # type: ignore[arg-type]
                                          temperature=0, max_tokens=16)
    embedded = complete(client, encoder, model=serve_graph.model, messages=MESSAGES,
                        spelling=spelling, temperature=0, max_tokens=16)
    assert embedded.choices[0].text == chat.choices[0].message.content
    by_chat, by_client = upstream_embeds(serve_graph.proxy.bodies[before:])
    assert by_client == by_chat
