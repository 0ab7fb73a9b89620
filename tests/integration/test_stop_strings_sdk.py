"""Stop strings through Serve with the official OpenAI SDK: the answers are cut as vLLM cuts
them, and no body the upstream received holds a stop string (the recording proxy in front
of the reference upstream keeps every one)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.integration

FRANCE = "What is the capital of France?"
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about Japan."}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 24}
CANARY = "CANARY-stop-5e1d"  # its "-" is outside base64: no payload holds it by chance


def sent_since(serve_graph: Any, before: int) -> list[dict[str, Any]]:
    """The bodies the upstream received since `before`, each without its embeddings."""
    bodies = [orjson.loads(raw) for raw in serve_graph.proxy.bodies[before:]]
    for raw, body in zip(serve_graph.proxy.bodies[before:], bodies, strict=True):
        assert CANARY.encode() not in raw
        body.pop("prompt_embeds")
    return bodies


def test_completions_are_cut_in_the_gateway(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    plain = client.completions.create(model=serve_graph.model, prompt=FRANCE, **GREEDY)
    text = plain.choices[0].text
    stop = text[6:10]
    cut = text.find(stop)
    before = len(serve_graph.proxy.bodies)
    whole = client.completions.create(model=serve_graph.model, prompt=FRANCE,
                                      stop=[CANARY, stop], **GREEDY)
    [choice] = whole.choices
    assert (choice.text, choice.finish_reason) == (text[:cut], "stop")
    assert choice.model_extra["stop_reason"] == stop  # vLLM's field, beyond OpenAI's schema
    assert whole.usage is not None
    assert whole.usage.completion_tokens == cut + len(stop)  # one token a character here
    chunks = list(client.completions.create(
        model=serve_graph.model, prompt=FRANCE, stop=[CANARY, stop], stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text[:cut]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == cut + len(stop)
    for body in sent_since(serve_graph, before):
        assert "stop" not in body and stop not in orjson.dumps(body).decode()
        assert body["stream"] is True


def test_chat_is_cut_in_the_gateway(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    plain = client.chat.completions.create(model=serve_graph.model, messages=MESSAGES,
                                           **GREEDY)
    text = plain.choices[0].message.content
    assert text is not None and len(text) > 12
    stop = text[8:11]
    cut = text.find(stop)
    before = len(serve_graph.proxy.bodies)
    whole = client.chat.completions.create(model=serve_graph.model, messages=MESSAGES,
                                           stop=[stop, CANARY], **GREEDY)
    [choice] = whole.choices
    assert (choice.message.content, choice.finish_reason) == (text[:cut], "stop")
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=serve_graph.model, messages=MESSAGES, stop=[stop, CANARY], stream=True,
            **GREEDY)
        if chunk.choices)
    assert streamed == text[:cut]
    for body in sent_since(serve_graph, before):
        assert "stop" not in body and stop not in orjson.dumps(body).decode()
