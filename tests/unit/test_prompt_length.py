"""Length before work: text that cannot fit is refused before it is tokenized, truncated
text is cut before it is tokenized, no request makes the tokenizer read more than
`limits.max_text_chars` characters, and a prompt that exactly fills the context is served."""

from __future__ import annotations

import io
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pybase64
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from serve_app.config import LimitsConfig, TokenizationConfig
from serve_app.prompts.text_budget import MEASURED_CHARS_PER_TOKEN, TextBudget, chars_per_token
from tests.unit.gateway_client import (
    GREEDY,
    GatewayFactory,
    RecordingASGITransport,
    error_of,
    post,
)

CHAT = "/v1/chat/completions"
HUGE = 4_000_000
"""Characters of an over-long prompt: tokenized whole, it costs the demo tokenizer seconds."""


@pytest.fixture
def tokenized(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The length of every text any tokenizer is asked to tokenize."""
    lengths: list[int] = []
    original = TokenizersBackend.__call__

    def spy(self: Any, text: Any = None, *args: Any, **kwargs: Any) -> Any:
        texts = [text] if isinstance(text, str) else list(text or [])
        lengths.extend(len(t) for t in texts if isinstance(t, str))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "__call__", spy)
    yield lengths


def words(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["the", "capital", "of", "France", "is", "Paris", "élan",
                                "東京", "🇫🇷", "\n", "</s>", "x" * 30]) for _ in range(count))


# --------------------------------------------------------------------------- the bound


def test_bounds_of_the_demo_tokenizers(demo_tokenizer: Any, demo_encoder_dir: Any) -> None:
    # Byte-level: one byte per token, but a parsed special-token string covers up to 13.
    assert chars_per_token(demo_tokenizer, parse_special=False) == 1
    assert chars_per_token(demo_tokenizer, parse_special=True) == len("<|assistant|>")
    assert TextBudget.of(demo_tokenizer, parse_special=True).chars_per_token == len(
        "<|assistant|>")
    # WordPiece drops whitespace: no bound from length alone, so the measured one.
    encoder = PreTrainedTokenizerFast.from_pretrained(demo_encoder_dir)
    assert chars_per_token(encoder, parse_special=True) is None
    assert TextBudget.of(encoder).chars_per_token == MEASURED_CHARS_PER_TOKEN


def sentencepiece_like(normalizer: Any) -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "ab": 4, "▁ab": 5, "▁abab": 6}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("▁", "ab"), ("▁ab", "ab")],
                                unk_token="<unk>"))
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_bounds_follow_the_pipeline() -> None:
    assert chars_per_token(sentencepiece_like(None), True) == len("▁abab")
    # Composition can shrink text up to four code points to one.
    assert chars_per_token(sentencepiece_like(normalizers.NFC()), True) == 4 * len("▁abab")
    # Normalizers that delete characters leave no bound.
    assert chars_per_token(sentencepiece_like(normalizers.StripAccents()), True) is None
    assert chars_per_token(sentencepiece_like(normalizers.Strip()), True) is None
    # SentencePiece's space -> "▁" keeps every character; a replacement that shortens, or a
    # regex that may, does not.
    assert chars_per_token(sentencepiece_like(normalizers.Replace(" ", "▁")), True) == 5
    assert chars_per_token(sentencepiece_like(normalizers.Replace("  ", " ")), True) is None
    assert chars_per_token(sentencepiece_like(
        normalizers.Replace(Regex(" +"), " ")), True) is None
    # A bound looser than the measured density gives way to it.
    assert chars_per_token(sentencepiece_like(normalizers.NFKC()), True) == 20
    assert TextBudget.of(sentencepiece_like(normalizers.NFKC())).chars_per_token == 16


@settings(max_examples=30, deadline=None)
@given(count=st.integers(1, 12000), seed=st.integers(0, 1000), limit=st.integers(1, 600))
def test_a_refusal_is_never_wrong(demo_tokenizer: Any, demo_encoder_dir: Any, count: int,
                                  seed: int, limit: int) -> None:
    """For text within the measured density (these words are), a refusal from length
    alone is never wrong."""
    encoder = _encoder(demo_encoder_dir)
    text = words(count, seed)
    for tokenizer, parse in ((demo_tokenizer, True), (demo_tokenizer, False), (encoder, True)):
        budget = TextBudget.of(tokenizer, parse)
        tokens = len(tokenizer(text, add_special_tokens=False,
                               split_special_tokens=not parse).input_ids)
        refused = budget.exceeds([text], limit)
        if refused:
            assert tokens > limit
        # And it refuses what its bound rules out: a budget that never refused would pass
        # the check above whatever it was given.
        assert refused == (len(text) > limit * budget.chars_per_token)


_ENCODERS: dict[str, Any] = {}


def _encoder(path: Any) -> Any:
    if str(path) not in _ENCODERS:
        _ENCODERS[str(path)] = PreTrainedTokenizerFast.from_pretrained(path)
    return _ENCODERS[str(path)]


@pytest.mark.parametrize("side", ["END", "START"])
def test_truncation_tokenizes_only_what_it_keeps(demo_encoder_dir: Any, side: str) -> None:
    encoder = _encoder(demo_encoder_dir)
    budget = TextBudget.of(encoder)
    text = words(300_000, seed=3)
    cut = budget.truncated(text, 100, side)  # type: ignore[arg-type]
    assert len(cut) == budget.kept_chars(100) == 104 * MEASURED_CHARS_PER_TOKEN
    whole = encoder(text, add_special_tokens=False).input_ids
    kept = encoder(cut, add_special_tokens=False).input_ids
    if side == "END":
        assert kept[:100] == whole[:100]
    else:
        assert kept[-100:] == whole[-100:]


# --------------------------------------------------------------------------- the routes


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "x" * HUGE}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "x" * HUGE]}, "prompt.1"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * HUGE}]},
         "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                  "chat_template_kwargs": {"note": "x" * HUGE}}, "messages"),
        ("/v1/embeddings", {"model": "serve-app-demo-embed", "input": "x " * (HUGE // 2)},
         "input"),
        ("/v2/embed", {"model": "serve-app-demo-embed", "texts": ["x " * (HUGE // 2)],
                       "truncate": "NONE"}, "texts.0"),
    ],
)
async def test_over_long_text_is_refused_before_it_is_tokenized(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, tokenized: list[int],
    path: str, body: dict[str, Any], param: str,
) -> None:
    body.setdefault("model", "serve-app-demo")
    error = error_of(await post(gateway, path, **body), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert tokenized == []  # refused from its length alone
    assert recorder.bodies == []


async def test_many_prompts_that_each_fit_are_bounded_together(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(max_prompt_tokens=1000))
    error = error_of(await post(gateway, prompt=["x" * 400] * 3, **GREEDY), 400)
    assert error["code"] == "too_many_tokens" and "limits.max_prompt_tokens" in error["message"]
    assert recorder.bodies == []
    assert (await post(gateway, prompt=["x" * 400] * 2, **GREEDY)).status_code == 200


@pytest.mark.parametrize("truncation", [{"truncate_prompt_tokens": -1},
                                        {"truncate_prompt_tokens": 20}])
async def test_a_huge_input_is_truncated_without_tokenizing_it_whole(
    gateway: httpx.AsyncClient, tokenized: list[int], truncation: dict[str, int],
) -> None:
    text = words(600_000, seed=5)
    body = {"model": "serve-app-demo-embed", "input": [text, text[:20_000]], **truncation}
    response = await post(gateway, "/v1/embeddings", **body)
    assert response.status_code == 200, response.text
    whole, head = (item["embedding"] for item in response.json()["data"])
    assert whole == head  # both cut to the same first tokens
    assert max(tokenized) <= 132 * MEASURED_CHARS_PER_TOKEN  # the model's 128 tokens, and 4


# --------------------------------------------------------------------------- the context, exactly

CONTEXT = 512
"""The demo model's context length, in tokens."""
ROOM = CONTEXT - GREEDY["max_tokens"]
"""The prompt tokens that fit beside GREEDY's max_tokens: a prompt of this many fills the
context exactly."""

Filler = Callable[[httpx.AsyncClient, int], Awaitable[tuple[str, dict[str, Any]]]]


def tensor_b64(rows: int) -> str:
    buffer = io.BytesIO()
    torch.save(torch.full((rows, 64), 0.01), buffer)  # the demo model's hidden size
    return pybase64.b64encode(buffer.getvalue()).decode("ascii")


async def chat_rows(gateway: httpx.AsyncClient, content: list[dict[str, str]]) -> int:
    """The prompt tokens of a one-message chat, as the gateway counts them."""
    response = await post(gateway, CHAT, messages=[{"role": "user", "content": content}],
                          temperature=0, max_tokens=1)
    assert response.status_code == 200, response.text
    rows: int = response.json()["usage"]["prompt_tokens"]
    return rows


async def chat_text(gateway: httpx.AsyncClient, rows: int) -> tuple[str, dict[str, Any]]:
    """A chat whose one message's text brings the rendered prompt to `rows` tokens (the
    demo tokenizer reads each ASCII letter as one token)."""
    template = await chat_rows(gateway, [{"type": "text", "text": "x"}]) - 1
    text = "x" * (rows - template)
    return CHAT, {"messages": [{"role": "user", "content": text}]}


async def chat_embeds(gateway: httpx.AsyncClient, rows: int) -> tuple[str, dict[str, Any]]:
    """A chat whose `prompt_embeds` part brings the spliced prompt to `rows` rows."""
    parts = [{"type": "text", "text": "x"}, {"type": "prompt_embeds", "data": tensor_b64(1)}]
    template = await chat_rows(gateway, parts) - 1
    parts[1]["data"] = tensor_b64(rows - template)
    return CHAT, {"messages": [{"role": "user", "content": parts}]}


def completions(body: Callable[[int], dict[str, Any]]) -> Filler:
    async def fill(_: httpx.AsyncClient, rows: int) -> tuple[str, dict[str, Any]]:
        return "/v1/completions", body(rows)

    return fill


FILLERS: dict[str, tuple[Filler, dict[str, Any]]] = {
    "completions token ids": (completions(lambda rows: {"prompt": [5] * rows}), {}),
    "completions text": (completions(
        lambda rows: {"prompt": "x" * rows, "add_special_tokens": False}), {}),
    # Special-token strings read as text: one character per token, the tightest bound the
    # text is held to before it is tokenized (`prompts.text_budget`).
    "completions text, special tokens as text": (completions(
        lambda rows: {"prompt": "x" * rows, "add_special_tokens": False}),
        {"tokenization": TokenizationConfig(completion_special_tokens="text")}),
    "completions prompt_embeds": (completions(
        lambda rows: {"prompt_embeds": tensor_b64(rows)}), {}),
    "chat text": (chat_text, {}),
    "chat prompt_embeds part": (chat_embeds, {}),
}


@pytest.mark.parametrize(("form", "config"), FILLERS.values(), ids=list(FILLERS))
async def test_a_prompt_that_exactly_fills_the_context_is_served(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, form: Filler,
    config: dict[str, Any],
) -> None:
    """Prompt tokens plus max_tokens equal to the context is a request vLLM serves; one
    token more is the first it refuses."""
    gateway = make_gateway(recorder, **config)
    path, body = await form(gateway, ROOM)
    recorder.bodies.clear()
    response = await post(gateway, path, **body, **GREEDY)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == ROOM
    assert len(recorder.bodies) == 1

    path, body = await form(gateway, ROOM + 1)
    error = error_of(await post(gateway, path, **body, **GREEDY), 400)
    assert error["code"] == "context_length_exceeded"


# --------------------------------------------------------------------------- per request

LONG = 14_600
"""Characters of a text past any cut: 2,048 of them in one Cohere request are 30 MB."""
FITS = ("the capital of france is paris " * 16)[:496]
"""A demo-encoder input that fits its 128 tokens untruncated (96 tokens)."""


@dataclass(frozen=True)
class Case:
    """A route and option whose texts each fit, or are cut to fit: `over` of them come to
    more than `budget` characters to tokenize, `within` of them to less."""

    path: str
    body: Callable[[int], dict[str, Any]]
    param: str
    budget: int
    over: int
    within: int


def _embed(**body: Any) -> dict[str, Any]:
    return {"model": "serve-app-demo-embed", **body}


def _chat(count: int, chars: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "x" * chars}] * count


PROSE = words(3000, seed=7)[:LONG]
CASES = {
    "completions": Case("/v1/completions",
                        lambda n: {"prompt": ["x" * 400] * n, "max_tokens": 1},
                        "prompt", 60_000, 160, 10),
    # The demo model's 512-token context holds little chat text: a budget below it.
    "chat": Case("/v1/chat/completions",
                 lambda n: {"messages": _chat(n, 100), "max_tokens": 1}, "messages", 350, 4, 2),
    "embeddings": Case("/v1/embeddings", lambda n: _embed(input=[FITS] * n), "input",
                       60_000, 130, 60),
    "embeddings truncated": Case(
        "/v1/embeddings", lambda n: _embed(input=[PROSE] * n, truncate_prompt_tokens=-1),
        "input", 60_000, 30, 15),
    "embeddings truncated to 5": Case(
        "/v1/embeddings", lambda n: _embed(input=[PROSE] * n, truncate_prompt_tokens=5),
        "input", 60_000, 420, 200),
    "cohere (truncate END)": Case("/v2/embed", lambda n: _embed(texts=[PROSE] * n), "texts",
                                  60_000, 30, 15),
    "cohere truncate START": Case(
        "/v2/embed", lambda n: _embed(texts=[PROSE] * n, truncate="START"), "texts",
        60_000, 30, 15),
    "cohere truncate NONE": Case(
        "/v2/embed", lambda n: _embed(texts=[FITS] * n, truncate="NONE"), "texts",
        60_000, 130, 60),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_a_request_over_max_text_chars_is_refused_before_tokenizing(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, tokenized: list[int],
    case: Case,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(max_text_chars=case.budget))
    tokenized.clear()  # what the gateway's start-up probes of its chat template read
    error = error_of(await post(gateway, case.path, **case.body(case.over)), 400)
    assert error["code"] == "too_much_text" and error["param"] == case.param
    assert "limits.max_text_chars" in error["message"]
    assert tokenized == []
    assert recorder.bodies == []


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_a_request_within_max_text_chars_is_served_and_reads_no_more(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, tokenized: list[int],
    case: Case,
) -> None:
    gateway = make_gateway(recorder, limits=LimitsConfig(max_text_chars=case.budget))
    tokenized.clear()  # what the gateway's start-up probes of its chat template read
    response = await post(gateway, case.path, **case.body(case.within))
    assert response.status_code == 200, response.text
    assert 0 < sum(tokenized) <= case.budget
