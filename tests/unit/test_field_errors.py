"""A refused field deep in a request is named by its dotted path (`messages.0.foo`), in the
error's `param` and message, on every API: unknown fields, bad values and tool fields in
messages, content parts and options. The request models refuse with pydantic's errors
(validators raise `ValueError`s, never HTTP errors), and one mapping turns them into the
OpenAI error. What is refused after validation, by the safe decode or a check that needs
the model (a client tensor, an input over the token limit, a token id outside the
vocabulary), is named by its path too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from serve_app import protocol
from serve_app.protocol import (
    ChatCompletionRequest,
    CohereEmbedRequest,
    CompletionRequest,
    EmbeddingRequest,
    RequestModel,
)
from tests.unit.gateway_client import CANARY, FRANCE, MODEL, RecordingASGITransport, error_of

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
EMBEDDINGS, COHERE = "/v1/embeddings", "/v2/embed"
EMBED = "serve-app-demo-embed"
MODELS: dict[str, type[RequestModel]] = {
    COMPLETIONS: CompletionRequest, CHAT: ChatCompletionRequest,
    EMBEDDINGS: EmbeddingRequest, COHERE: CohereEmbedRequest,
}
BASE: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"model": MODEL, "prompt": FRANCE},
    CHAT: {"model": MODEL},
    EMBEDDINGS: {"model": EMBED},
    COHERE: {"model": EMBED, "texts": [FRANCE]},
}
USER = {"role": "user", "content": FRANCE}
TEXT = {"type": "text", "text": FRANCE}


def said(*content: Any, **message: Any) -> dict[str, Any]:
    """A user message whose content is `content`'s parts, with `message`'s fields."""
    return {"role": "user", "content": list(content), **message}


CASES = [
    # chat: messages and their fields
    (CHAT, {"messages": [USER, {**USER, "foo": CANARY}]}, "messages.1.foo",
     "unrecognized_argument"),
    (CHAT, {"messages": [{"role": CANARY, "content": FRANCE}]}, "messages.0.role",
     "invalid_request"),
    (CHAT, {"messages": [USER, {**USER, "name": 7}]}, "messages.1.name", "invalid_request"),
    # chat: content parts
    (CHAT, {"messages": [USER, said(TEXT, {**TEXT, "image_url": {"url": CANARY}})]},
     "messages.1.content.1.image_url", "unrecognized_argument"),
    (CHAT, {"messages": [said(TEXT, {"type": "text", "text": 7})]}, "messages.0.content.1.text",
     "invalid_request"),
    (CHAT, {"messages": [said({"type": "text"})]}, "messages.0.content.0.text",
     "invalid_request"),
    (CHAT, {"messages": [said({"type": "prompt_embeds", "data": 7})]},
     "messages.0.content.0.data", "invalid_request"),
    (CHAT, {"messages": [said({"type": "prompt_embeds", "data": "AAAA", "dtype": CANARY})]},
     "messages.0.content.0.dtype", "unrecognized_argument"),
    (CHAT, {"messages": [said(TEXT, {"type": "image_url", "image_url": {"url": CANARY}})]},
     "messages.0.content.1.type", "invalid_request"),
    # chat: tool fields, refused where they stand
    (CHAT, {"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": CANARY, "arguments": "{}"}}]}]},
     "messages.1.tool_calls", "unsupported_parameter"),
    (CHAT, {"messages": [USER, {"role": "assistant", "content": "x", "tool_call_id": "1"}]},
     "messages.1.tool_call_id", "unsupported_parameter"),
    (CHAT, {"messages": [USER, {"role": "tool", "content": CANARY}]}, "messages.1.role",
     "unsupported_parameter"),
    (CHAT, {"messages": [USER, {"role": "assistant", "content": None, "function_call": {
        "name": CANARY, "arguments": "{}"}}]}, "messages.1.function_call",
     "unsupported_parameter"),
    (CHAT, {"messages": [USER], "tools": [{"type": "function", "function": {"name": 7}}]},
     "tools", "unsupported_parameter"),
    (CHAT, {"messages": [USER], "tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
    (CHAT, {"messages": [USER], "tool_choice": {"type": "function", "function": {
        "name": CANARY}}}, "tool_choice", "unsupported_parameter"),
    # chat: nested options
    (CHAT, {"messages": [USER], "stream_options": {"include_usage": True, "foo": 1}},
     "stream_options.foo", "unrecognized_argument"),
    (CHAT, {"messages": [USER], "stop": ["a", 7]}, "stop.1", "invalid_request"),
    # completions
    (COMPLETIONS, {"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage",
     "invalid_request"),
    (COMPLETIONS, {"logit_bias": {"17": 500}}, "logit_bias.17", "invalid_request"),
    (COMPLETIONS, {"stop": ["a", ""]}, "stop.1", "invalid_request"),
    (COMPLETIONS, {"prompt_embeds": ["AAAA", 7]}, "prompt_embeds.1", "invalid_request"),
    # embeddings: chat messages
    (EMBEDDINGS, {"messages": [{**USER, "foo": CANARY}]}, "messages.0.foo",
     "unrecognized_argument"),
    (EMBEDDINGS, {"messages": [said(TEXT, {**TEXT, "x": CANARY})]},
     "messages.0.content.1.x", "unrecognized_argument"),
    (EMBEDDINGS, {"messages": [said({"type": "prompt_embeds", "data": "AAAA"})]},
     "messages.0.content.0.type", "invalid_request"),
    (EMBEDDINGS, {"messages": [USER, {"role": "tool", "content": CANARY}]},
     "messages.1.role", "unsupported_parameter"),
    # Cohere
    (COHERE, {"texts": [FRANCE, 7]}, "texts.1", "invalid_request"),
    (COHERE, {"embedding_types": ["float", CANARY]}, "embedding_types.1", "invalid_request"),
]


@pytest.mark.parametrize(("path", "change", "param", "code"), CASES)
async def test_a_nested_field_is_refused_by_its_path(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    change: dict[str, Any], param: str, code: str,
) -> None:
    body = {**BASE[path], **change}
    error = error_of(await gateway.post(path, json=body), 400)
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]
    assert CANARY not in error["message"]  # the field's path, never its value
    assert recorder.bodies == []


@pytest.mark.parametrize(("path", "change", "param", "code"), CASES)
def test_request_models_refuse_with_validation_errors(
    path: str, change: dict[str, Any], param: str, code: str,
) -> None:
    """Validators raise `ValueError`s, which pydantic collects with their location; an HTTP
    error raised inside one would lose it."""
    with pytest.raises(ValidationError):
        MODELS[path].model_validate({**BASE[path], **change})


def test_request_validators_cannot_raise_http_errors() -> None:
    """The request models know no HTTP error: one raised in a validator would escape
    pydantic and reach the client without the field's location."""
    package = Path(protocol.__file__).parent
    speaking_http = [path.name for path in sorted(package.glob("*.py"))
                     if "GatewayError" in path.read_text()]
    assert speaking_http == []


NOT_A_TENSOR = "bm90IGEgdGVuc29y"  # valid base64 of text, not of a torch.save archive


def embeds_part(data: str) -> dict[str, str]:
    return {"type": "prompt_embeds", "data": data}


@pytest.mark.parametrize(("path", "change", "param"), [
    (CHAT, lambda good: {"messages": [
        {"role": "system", "content": FRANCE},
        said(TEXT, embeds_part(good), embeds_part(NOT_A_TENSOR))]},
     "messages.1.content.2.data"),
    (CHAT, lambda good: {"messages": [said(embeds_part(NOT_A_TENSOR), embeds_part(good))]},
     "messages.0.content.0.data"),
    (COMPLETIONS, lambda good: {"prompt": "", "prompt_embeds": [good, NOT_A_TENSOR]},
     "prompt_embeds.1"),
    (COMPLETIONS, lambda good: {"prompt": "", "prompt_embeds": NOT_A_TENSOR}, "prompt_embeds"),
])
async def test_a_refused_client_tensor_is_named_by_its_path(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, embed: Any, path: str,
    change: Any, param: str,
) -> None:
    """A tensor the safe decode refuses (after validation) is named by the path of the part
    or list item that carries it, beside well-formed ones."""
    body = {**BASE[path], **change(embed(FRANCE))}
    error = error_of(await gateway.post(path, json=body), 400)
    assert (error["param"], error["code"]) == (param, "invalid_prompt_embeds")
    assert param in error["message"]
    assert recorder.bodies == []


LONG = "paris " * 200  # more than the embedding model's 128 tokens


@pytest.mark.parametrize(("path", "change", "param", "code"), [
    (EMBEDDINGS, {"input": [[5, 6], []]}, "input.1", 400),
    (EMBEDDINGS, {"input": [[5], [5, 10_000_000]]}, "input.1", 400),
    (EMBEDDINGS, {"input": [5, 10_000_000]}, "input", 400),
    (EMBEDDINGS, {"input": [FRANCE, FRANCE, LONG]}, "input.2", "context_length_exceeded"),
    (EMBEDDINGS, {"input": LONG}, "input", "context_length_exceeded"),
    (EMBEDDINGS, {"input": [list(range(5, 200))]}, "input.0", "context_length_exceeded"),
    (COHERE, {"texts": [FRANCE, LONG], "truncate": "NONE"}, "texts.1",
     "context_length_exceeded"),
    (COMPLETIONS, {"prompt": [[5, 6], []]}, "prompt.1", 400),
    (COMPLETIONS, {"prompt": [[5], [5, 10_000_000]]}, "prompt.1", 400),
    (COMPLETIONS, {"prompt": [5, 10_000_000]}, "prompt", 400),
    (COMPLETIONS, {"prompt": [FRANCE, "paris " * 5000]}, "prompt.1", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": [[5], list(range(5, 200)) * 40]}, "prompt.1",
     "context_length_exceeded"),
    (COMPLETIONS, {"stop_token_ids": [1, 300]}, "stop_token_ids.1", 400),
    (CHAT, {"messages": [USER], "logit_bias": {"5": 1, "300": 1}}, "logit_bias.300",
     400),
])
async def test_a_checked_input_is_refused_by_its_path(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, path: str,
    change: dict[str, Any], param: str, code: str | int,
) -> None:
    """Checks that need the model (its vocabulary, its token limit) run after validation;
    their refusals name the item of a list that fails, not the list."""
    error = error_of(await gateway.post(path, json={**BASE[path], **change}), 400)
    assert (error["param"], error["code"]) == (param, code)
    assert param in error["message"]
    assert recorder.bodies == []
