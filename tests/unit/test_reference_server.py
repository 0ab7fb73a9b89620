"""The reference upstream's HTTP app, driven in-process through httpx.ASGITransport."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import httpx
import orjson
import pybase64
import pytest
import torch

from serve_app.config import ReferenceConfig
from serve_app.protocol import CompletionRequest
from serve_app.reference.app import create_reference_app
from serve_app.reference.generation import TextDelta
from serve_app.reference.server import ReferenceServer

MODEL = "serve-app-demo"
FRANCE = "What is the capital of France?"
JAPAN = "Tell me about Japan."


@pytest.fixture(scope="module")
def backend(cache_dir: Path) -> ReferenceServer:
    return ReferenceServer.from_config(ReferenceConfig())


@pytest.fixture(scope="module")
def reference_app(backend: ReferenceServer) -> Any:
    return create_reference_app(backend)


@pytest.fixture
def client(reference: httpx.AsyncClient) -> httpx.AsyncClient:
    """conftest's ASGI client, over this module's `reference_app` (and its `backend`)."""
    return reference


@pytest.fixture(scope="module")
def embed(demo_tokenizer: Any, demo_causal_lm: Any) -> Any:
    """Text -> (embeddings tensor, base64 of torch.save of it), as a client computes them."""

    def compute(text: str) -> tuple[torch.Tensor, str]:
        ids = torch.tensor(demo_tokenizer(text).input_ids)
        with torch.no_grad():
            tensor = demo_causal_lm.get_input_embeddings()(ids)
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return tensor, pybase64.b64encode(buffer.getvalue()).decode("ascii")

    return compute


@pytest.fixture(scope="module")
def hf_greedy(demo_tokenizer: Any, demo_causal_lm: Any) -> Any:
    def generate(tensor: torch.Tensor, max_new_tokens: int) -> str:
        inputs = tensor[None]
        with torch.no_grad():
            out = demo_causal_lm.generate(
                inputs_embeds=inputs,
                attention_mask=torch.ones(inputs.shape[:2], dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=demo_tokenizer.pad_token_id,
            )
        return demo_tokenizer.decode(out[0], skip_special_tokens=True)

    return generate


async def complete(client: httpx.AsyncClient, **body: Any) -> httpx.Response:
    body.setdefault("model", MODEL)
    return await client.post("/v1/completions", json=body)


async def ok(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await complete(client, **body)
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def parse_sse(text: str) -> list[Any]:
    """Each `data:` event in order; `[DONE]` kept as the string."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("prompt", [FRANCE, JAPAN])
async def test_greedy_matches_transformers_generate(
    client: httpx.AsyncClient, embed: Any, hf_greedy: Any, prompt: str
) -> None:
    tensor, b64 = embed(prompt)
    body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=24)
    expected = hf_greedy(tensor, 24)
    assert expected  # the demo model writes something
    assert body["model"] == MODEL
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == expected
    assert body["usage"]["prompt_tokens"] == tensor.shape[0]


async def test_greedy_is_deterministic(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(JAPAN)
    texts = [
        (await ok(client, prompt_embeds=b64, temperature=0, max_tokens=20))["choices"][0]["text"]
        for _ in range(3)
    ]
    assert texts[0] and texts.count(texts[0]) == 3


async def test_3d_tensor_and_nim_spelling(client: httpx.AsyncClient, embed: Any) -> None:
    tensor, b64 = embed(FRANCE)
    buffer = io.BytesIO()
    torch.save(tensor[None], buffer)
    batched = pybase64.b64encode(buffer.getvalue()).decode()
    base = (await ok(client, prompt_embeds=b64, temperature=0, max_tokens=12))["choices"]
    from_3d = (await ok(client, prompt_embeds=batched, temperature=0, max_tokens=12))["choices"]
    nim = await complete(client, prompt="", temperature=0, max_tokens=12, **{"prompt-embeds": b64})
    assert nim.status_code == 200, nim.text
    assert from_3d[0]["text"] == base[0]["text"] == nim.json()["choices"][0]["text"]


async def test_max_tokens_gives_length(client: httpx.AsyncClient, embed: Any) -> None:
    tensor, b64 = embed(FRANCE)
    for max_tokens in (1, 7):
        body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=max_tokens)
        [choice] = body["choices"]
        assert choice["finish_reason"] == "length"
        assert len(choice["text"]) == max_tokens  # byte-level tokens of ASCII text
        usage = body["usage"]
        assert usage["completion_tokens"] == max_tokens
        assert usage["prompt_tokens"] == tensor.shape[0]
        assert usage["total_tokens"] == tensor.shape[0] + max_tokens


async def test_default_max_tokens(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(FRANCE)
    body = await ok(client, prompt_embeds=b64, temperature=0)
    assert body["usage"]["completion_tokens"] == ReferenceConfig().max_tokens_default


async def test_stop_string_truncates(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(FRANCE)
    greedy = (await ok(client, prompt_embeds=b64, temperature=0, max_tokens=32))["choices"][0]
    text = greedy["text"]
    assert len(text) >= 12
    stop = text[6:10]
    expected = text[: text.find(stop)]
    for stops in (stop, [stop], ["never-appears-xyz", stop]):
        body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=32, stop=stops)
        [choice] = body["choices"]
        assert choice["text"] == expected
        assert stop not in choice["text"]
        assert choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < 32


def new_char_at(text: str, start: int = 8) -> int:
    """The first position from `start` whose character the text has not had before."""
    return next(i for i in range(start, len(text)) if text[i] not in text[:i])


async def test_stop_strings_report_their_stop_reason(
    client: httpx.AsyncClient, embed: Any
) -> None:
    """vLLM: `stop_reason` is the stop string; the tokens up to the one that completed it
    count; `include_stop_str_in_output` keeps the string."""
    _, b64 = embed(FRANCE)
    args = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 32}
    text = (await ok(client, **args))["choices"][0]["text"]
    stop = text[6:10]
    assert text.find(stop) == 6
    for include, kept in ((False, text[:6]), (True, text[:10])):
        body = await ok(client, **args, stop=[stop], include_stop_str_in_output=include)
        [choice] = body["choices"]
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (
            kept, "stop", stop)
        assert body["usage"]["completion_tokens"] == 10  # one byte-level token a character


async def test_stop_token_ids(client: httpx.AsyncClient, embed: Any, demo_tokenizer: Any) -> None:
    """vLLM: a stop token ends the choice with its id as `stop_reason`, counts as a token,
    and its text is left out unless `include_stop_str_in_output`."""
    _, b64 = embed(FRANCE)
    args = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 32}
    text = (await ok(client, **args))["choices"][0]["text"]
    at = new_char_at(text)
    [token] = demo_tokenizer.encode(text[at], add_special_tokens=False)
    for include, kept in ((False, text[:at]), (True, text[: at + 1])):
        for stream in (False, True):
            response = await complete(client, **args, stop_token_ids=[token], stream=stream,
                                      include_stop_str_in_output=include)
            chunks = parse_sse(response.text)[:-1] if stream else [response.json()]
            assert "".join(c["choices"][0]["text"] for c in chunks) == kept
            assert chunks[-1]["choices"][0]["stop_reason"] == token
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    body = await ok(client, **args, stop_token_ids=[token])
    assert body["usage"]["completion_tokens"] == at + 1


async def test_the_first_listed_stop_wins_within_a_token(
    client: httpx.AsyncClient, embed: Any
) -> None:
    """vLLM's `check_stop_strings`: of the stop strings a token completes, the first listed
    wins, not the one that starts first."""
    _, b64 = embed(JAPAN)
    args = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 32}
    text = (await ok(client, **args))["choices"][0]["text"]
    at = new_char_at(text)
    char, ending = text[at], text[at - 2 : at + 1]
    for stops, kept, reason in (([char, ending], text[:at], char),
                                ([ending, char], text[: at - 2], ending)):
        [choice] = (await ok(client, **args, stop=stops))["choices"]
        assert (choice["text"], choice["stop_reason"]) == (kept, reason)


async def test_every_token_is_a_chunk_held_back_text_too(
    client: httpx.AsyncClient, embed: Any
) -> None:
    """vLLM streams one chunk per token, with empty text while a stop string's possible
    start is held back."""
    _, b64 = embed(FRANCE)
    args = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 20}
    text = (await ok(client, **args))["choices"][0]["text"]
    response = await complete(client, **args, stream=True, stop=[text[12:16], "Qq" * 4],
                              stream_options={"include_usage": True})
    *chunks, usage, _ = parse_sse(response.text)
    pieces = [chunk["choices"][0]["text"] for chunk in chunks]
    assert len(pieces) == usage["usage"]["completion_tokens"] == 16
    assert pieces[:7] == [""] * 7  # 7 characters held back
    assert "".join(pieces) == text[:12]


async def test_n_greedy_identical(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(JAPAN)
    single = (await ok(client, prompt_embeds=b64, temperature=0, max_tokens=10))["choices"][0]
    body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=10, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["text"] for c in body["choices"]] == [single["text"]] * 2
    assert body["usage"]["completion_tokens"] == 20


async def test_two_prompts_times_n(client: httpx.AsyncClient, embed: Any) -> None:
    (t_fr, fr), (t_jp, jp) = embed(FRANCE), embed(JAPAN)
    text_fr = (await ok(client, prompt_embeds=fr, temperature=0, max_tokens=12))["choices"][0]
    text_jp = (await ok(client, prompt_embeds=jp, temperature=0, max_tokens=12))["choices"][0]
    assert text_fr["text"] != text_jp["text"]
    body = await ok(client, prompt_embeds=[fr, jp], temperature=0, max_tokens=12, n=2)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [text_fr["text"]] * 2 + [text_jp["text"]] * 2
    assert body["usage"]["prompt_tokens"] == t_fr.shape[0] + t_jp.shape[0]


async def test_seed_reproducible(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(JAPAN)

    async def sample(seed: int) -> str:
        body = await ok(client, prompt_embeds=b64, temperature=1.0, seed=seed, max_tokens=24)
        return body["choices"][0]["text"]

    assert await sample(7) == await sample(7)
    assert await sample(123) == await sample(123)
    # The seed really drives sampling: several seeds do not all give one text.
    assert len({await sample(seed) for seed in range(5)}) > 1


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("with_stop", [False, True])
async def test_stream_matches_non_stream(
    client: httpx.AsyncClient, embed: Any, with_stop: bool
) -> None:
    _, b64 = embed(FRANCE)
    params: dict[str, Any] = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 28}
    stop = None
    if with_stop:
        text = (await ok(client, **params))["choices"][0]["text"]
        stop = text[8:12]
        params["stop"] = stop
    full = await ok(client, **params)
    response = await complete(client, stream=True, **params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks and all(e["model"] == MODEL for e in chunks)
    assert all("usage" not in e or e["usage"] is None for e in chunks)
    assert "".join(e["choices"][0]["text"] for e in chunks) == full["choices"][0]["text"]
    finishes = [e["choices"][0]["finish_reason"] for e in chunks]
    assert finishes[-1] == full["choices"][0]["finish_reason"]
    assert finishes[:-1] == [None] * (len(finishes) - 1)
    if stop is not None:
        assert all(stop not in e["choices"][0]["text"] for e in chunks)


async def test_stream_include_usage(client: httpx.AsyncClient, embed: Any) -> None:
    tensor, b64 = embed(JAPAN)
    response = await complete(
        client, prompt_embeds=b64, temperature=0, max_tokens=9, n=2, stream=True,
        stream_options={"include_usage": True},
    )
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"] == []
    rows = tensor.shape[0]
    assert final["usage"] == {"prompt_tokens": rows, "completion_tokens": 18,
                              "total_tokens": rows + 18}
    texts: dict[int, str] = {}
    for event in events[:-2]:
        [choice] = event["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert set(texts) == {0, 1}
    assert texts[0] == texts[1] and len(texts[0]) == 9


async def test_last_token_chunk_carries_the_finish_reason(
    client: httpx.AsyncClient, embed: Any
) -> None:
    """vLLM's stream framing: the chunk of a choice's last token carries its finish_reason
    (no extra empty chunk after it), and usage comes alone in a chunk with `choices: []`."""
    _, b64 = embed(JAPAN)
    response = await complete(client, prompt_embeds=b64, temperature=0, max_tokens=7, n=2,
                              logprobs=0, stream=True, stream_options={"include_usage": True})
    *chunks, usage, done = parse_sse(response.text)
    assert done == "[DONE]" and usage["choices"] == [] and usage["usage"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        tokens = [len(choice["logprobs"]["tokens"]) for choice in mine]
        assert all(tokens) and sum(tokens) == 7, tokens  # every chunk brings a token
        assert [c["finish_reason"] for c in mine] == [None] * (len(mine) - 1) + ["length"]


async def test_stream_validation_error_is_http_error(
    client: httpx.AsyncClient, embed: Any
) -> None:
    response = await complete(client, prompt="plain text", stream=True)
    assert error_of(response, 400)["param"] == "prompt"


# --------------------------------------------------------------------------- rejections


async def test_text_prompt_rejected(client: httpx.AsyncClient, embed: Any) -> None:
    error = error_of(await complete(client, prompt="Tell me about France."), 400)
    assert error["param"] == "prompt"
    _, b64 = embed(FRANCE)
    error_of(await complete(client, prompt="some text", prompt_embeds=b64), 400)
    error_of(await complete(client, prompt=[1, 2, 3]), 400)


async def test_missing_embeds_rejected(client: httpx.AsyncClient) -> None:
    error = error_of(await complete(client), 400)
    assert error["param"] == "prompt_embeds"


async def test_unknown_model(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(FRANCE)
    error = error_of(await complete(client, model="gpt-4", prompt_embeds=b64), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("field", "value"), [("echo", True), ("suffix", "tail"), ("prompt_logprobs", 1)]
)
async def test_incompatible_options(
    client: httpx.AsyncClient, embed: Any, field: str, value: Any
) -> None:
    _, b64 = embed(FRANCE)
    error = error_of(await complete(client, prompt_embeds=b64, **{field: value}), 400)
    assert "not compatible" in error["message"]
    assert error["param"] == field


@pytest.mark.parametrize(("field", "value"), [
    ("response_format", {"type": "json_object"}), ("structured_outputs", {"regex": "a+"}),
    ("guided_choice", ["yes", "no"])])
async def test_structured_outputs_are_refused_not_ignored(
    client: httpx.AsyncClient, embed: Any, field: str, value: Any
) -> None:
    # A gateway that forwards them must not get an unconstrained answer back silently.
    _, b64 = embed(FRANCE)
    error = error_of(await complete(client, prompt_embeds=b64, **{field: value}), 400)
    assert error["param"] == field and "not supported" in error["message"]


@pytest.mark.parametrize("bad", ["!!!not base64!!!", "QUJD", "", "QUJDRA=="])
async def test_invalid_embeds(client: httpx.AsyncClient, bad: str) -> None:
    error = error_of(await complete(client, prompt_embeds=bad), 400)
    assert error["param"] == "prompt_embeds"


async def test_wrong_hidden_size(client: httpx.AsyncClient) -> None:
    buffer = io.BytesIO()
    torch.save(torch.zeros(3, 7), buffer)
    error = error_of(
        await complete(client, prompt_embeds=pybase64.b64encode(buffer.getvalue()).decode()),
        400,
    )
    assert "hidden size" in error["message"]


async def test_context_length(client: httpx.AsyncClient, demo_causal_lm: Any) -> None:
    hidden = demo_causal_lm.config.hidden_size

    def encoded(rows: int) -> str:
        buffer = io.BytesIO()
        torch.save(torch.zeros(rows, hidden), buffer)
        return pybase64.b64encode(buffer.getvalue()).decode()

    error = error_of(await complete(client, prompt_embeds=encoded(500), max_tokens=13), 400)
    assert "maximum context length" in error["message"]
    error_of(await complete(client, prompt_embeds=encoded(500)), 400)  # default 16
    error_of(
        await complete(client, prompt_embeds=encoded(500), max_tokens=13, stream=True), 400
    )
    body = await ok(client, prompt_embeds=encoded(500), max_tokens=12, temperature=0)
    assert body["usage"]["prompt_tokens"] == 500


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", content=b"{not json")
    error_of(response, 400)


async def test_models_and_health(client: httpx.AsyncClient) -> None:
    models = (await client.get("/v1/models")).json()
    assert [card["id"] for card in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 512
    assert (await client.get("/health")).json() == {"status": "ok"}


def test_cancelled_generation_stops_at_the_next_token(
    backend: ReferenceServer, demo_tokenizer: Any, demo_causal_lm: Any
) -> None:
    ids = torch.tensor(demo_tokenizer(FRANCE).input_ids)
    with torch.no_grad():
        tensor = demo_causal_lm.get_input_embeddings()(ids)
    request = CompletionRequest(model=MODEL, prompt_embeds="unused", max_tokens=200,
                                temperature=0, n=3)
    cancelled = threading.Event()
    deltas: list[TextDelta] = []

    def emit(index: int, delta: TextDelta | None, finish: str | None, reason: Any) -> None:
        if delta:
            deltas.append(delta)
            cancelled.set()  # the client leaves after the first piece of text

    tokens = backend.run([tensor], request, emit, cancelled)
    assert 1 <= tokens <= 2  # not 3 x 200
    assert len(deltas) == 1


# --------------------------------------------------------------------------- logprobs, bias


def reference_logprobs(model: Any, tensor: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """log_softmax of the next-token logits after the prompt and each generated prefix."""
    with torch.no_grad():
        generated = model.get_input_embeddings()(torch.tensor(ids))
        logits = model(inputs_embeds=torch.cat([tensor, generated])[None]).logits[0]
    return torch.log_softmax(logits[tensor.shape[0] - 1 : -1].float(), dim=-1)


@pytest.mark.parametrize("k", [0, 1, 3])
async def test_logprobs_are_the_models(
    client: httpx.AsyncClient, embed: Any, demo_tokenizer: Any, demo_causal_lm: Any, k: int
) -> None:
    tensor, b64 = embed(FRANCE)
    body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=8, logprobs=k)
    [choice] = body["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens = logprobs["tokens"]
    assert len(tokens) == body["usage"]["completion_tokens"] == 8
    assert "".join(tokens) == choice["text"]
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    ids = [demo_tokenizer.convert_tokens_to_ids(demo_tokenizer.tokenize(t))[0] for t in tokens]
    expected = reference_logprobs(demo_causal_lm, tensor, ids)
    for step, (token, logprob, top) in enumerate(
        zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True)
    ):
        assert logprob == pytest.approx(float(expected[step, ids[step]]), abs=1e-4)
        assert logprob == pytest.approx(float(expected[step].max()), abs=1e-4)  # greedy
        # The sampled token, then the top k: greedy picks the top one, so max(k, 1) entries.
        assert len(top) == max(k, 1)
        assert top[token] == logprob
        best = torch.topk(expected[step], max(k, 1)).values.tolist()
        assert sorted(top.values(), reverse=True) == pytest.approx(best, abs=1e-4)


async def test_no_logprobs_unless_asked(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(FRANCE)
    body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=4)
    assert body["choices"][0]["logprobs"] is None


async def test_streamed_logprobs_join_to_the_non_streamed(
    client: httpx.AsyncClient, embed: Any
) -> None:
    _, b64 = embed(JAPAN)
    args = {"prompt_embeds": b64, "temperature": 0, "max_tokens": 12, "logprobs": 2}
    whole = (await ok(client, **args))["choices"][0]["logprobs"]
    response = await complete(client, stream=True, **args)
    chunks = [e for e in parse_sse(response.text) if e != "[DONE]"]
    joined: dict[str, list[Any]] = {key: [] for key in whole}
    for chunk in chunks:
        for key in whole:
            joined[key] += chunk["choices"][0]["logprobs"][key]
    assert joined == whole


async def test_logit_bias_steers_greedy_choice(
    client: httpx.AsyncClient, embed: Any, demo_tokenizer: Any
) -> None:
    _, b64 = embed(FRANCE)
    z = demo_tokenizer.convert_tokens_to_ids("z")
    body = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=5,
                    logit_bias={str(z): 100})
    assert body["choices"][0]["text"] == "zzzzz"


async def test_penalties_change_greedy_text(client: httpx.AsyncClient, embed: Any) -> None:
    _, b64 = embed(FRANCE)
    plain = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=24)
    text = plain["choices"][0]["text"]
    assert len(set(text)) < len(text)  # the unpenalised answer repeats characters
    penalised = await ok(client, prompt_embeds=b64, temperature=0, max_tokens=24,
                         presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised["choices"][0]["text"] != text


def test_penalties_follow_openai_formula() -> None:
    from serve_app.reference.generation import SamplingParams, _adjust

    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25,
                            logit_bias={2: 3.0})
    counts = torch.tensor([0.0, 1.0, 0.0, 4.0])
    adjusted = _adjust(torch.zeros(4), params, counts)
    assert adjusted.tolist() == [0.0, -0.75, 3.0, -1.5]
