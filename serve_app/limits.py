"""Request limits from `LimitsConfig` and `PrivacyConfig`, checked before any heavy work.

Each refusal is an OpenAI-shaped 400 naming the field and the limit. The limits on the
request as bytes (body size, body deadline, concurrency) are ASGI middleware, in
`api.middleware`. Text is bounded before it is tokenized: each text by its model's token
limit (`prompts.text_budget`), a request's texts together by `limits.max_text_chars`.
"""

from __future__ import annotations

from collections.abc import Collection

from serve_app.config import LimitsConfig, PrivacyConfig
from serve_app.errors import GatewayError, model_not_found, model_on_other_api
from serve_app.protocol import ChatCompletionRequest, CompletionRequest

SamplingRequest = CompletionRequest | ChatCompletionRequest


def check_model(model: str, served_name: str, embedding_models: Collection[str] = ()) -> None:
    """The generative model's name; one of the `embedding_models` exists, but elsewhere."""
    if model in embedding_models:
        raise model_on_other_api(model, "embeddings", "/v1/embeddings or /v2/embed")
    if model != served_name:
        raise model_not_found(model)


def check_context(rows: int, max_tokens: int | None, context: int,
                  param: str = "prompt") -> None:
    """A prompt of `rows` tokens and `max_tokens` to generate fit in the model's context;
    a refusal names `max_tokens` where it is set, else the prompt's path `param`."""
    if rows + (max_tokens or 0) > context:
        raise GatewayError(
            f"This model's maximum context length is {context} tokens; {param} has "
            f"{rows} tokens and max_tokens is {max_tokens or 0}.",
            400, param="max_tokens" if max_tokens else param,
            code="context_length_exceeded")


def check_embeds_compatible(request: CompletionRequest) -> None:
    """vLLM's refusals beside prompt embeddings (`echo`, `suffix`, a `best_of` other than
    `n`)."""
    incompatible = request.incompatible_with_embeds()
    if incompatible:
        raise GatewayError(f"{incompatible} is not compatible with prompt embeds.", 400,
                           param=incompatible)


def check_items(count: int, limits: LimitsConfig, param: str) -> None:
    if count > limits.max_items:
        raise GatewayError(f"{param} has {count} items; at most {limits.max_items} are "
                           "accepted in one request.", 400, param=param)


def check_text_chars(chars: int, limits: LimitsConfig, param: str) -> None:
    """The request's text, as it will be tokenized (truncated texts cut first), within
    `limits.max_text_chars`."""
    if chars > limits.max_text_chars:
        raise GatewayError(f"The request's text comes to {chars} characters to tokenize; at "
                           f"most {limits.max_text_chars} are accepted in one request "
                           "(limits.max_text_chars).", 400, param=param, code="too_much_text")


def check_sampling(request: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                   limits: LimitsConfig, vocab_size: int,
                   logprobs_param: str = "logprobs") -> None:
    """`n`, `max_tokens` and `logprobs` within their caps; every token id the request names
    (logit_bias keys, stop_token_ids, allowed_token_ids) in the vocabulary."""
    if request.n > limits.max_n:
        raise GatewayError(f"n is {request.n}; at most {limits.max_n} samples per prompt are "
                           "accepted.", 400, param="n")
    if max_tokens is not None and limits.max_tokens is not None and (
            max_tokens > limits.max_tokens):
        raise GatewayError(f"max_tokens is {max_tokens}; at most {limits.max_tokens} is "
                           "accepted.", 400, param="max_tokens")
    if logprobs is not None and logprobs > limits.max_logprobs:
        raise GatewayError(f"At most {limits.max_logprobs} logprobs per token can be asked "
                           f"for; the request asks for {logprobs}.", 400, param=logprobs_param)
    if request.min_tokens and max_tokens is not None and request.min_tokens > max_tokens:
        raise GatewayError(f"min_tokens ({request.min_tokens}) is above max_tokens "
                           f"({max_tokens}).", 400, param="min_tokens")
    outside = [path for path, i in _named_token_ids(request).items() if i >= vocab_size]
    if outside:
        raise GatewayError(f"{outside[0]} is a token id outside the vocabulary "
                           f"[0, {vocab_size}).", 400, param=outside[0])
    if request.top_k is not None and request.top_k > vocab_size:
        raise GatewayError(f"top_k is above the vocabulary size ({vocab_size}).", 400,
                           param="top_k")


def _named_token_ids(request: SamplingRequest) -> dict[str, int]:
    """Every token id the request's sampling fields name, by its path in the request
    (`stop_token_ids.2`, `logit_bias.50000`)."""
    named = {f"{field}.{index}": i for field in ("stop_token_ids", "allowed_token_ids")
             for index, i in enumerate(getattr(request, field) or [])}
    return named | {f"logit_bias.{key}": int(key) for key in request.logit_bias or {}}


def check_forwarding(request: SamplingRequest, privacy: PrivacyConfig) -> None:
    """Text fields that would go upstream, refused where the operator does not allow them.
    Stop strings are never refused: the gateway applies them itself unless
    `privacy.forward_stop` sends them on."""
    structured = request.structured_fields()
    if structured and not privacy.forward_structured_outputs:
        raise GatewayError(
            f"{structured[0]} is not accepted: structured outputs carry their schema, regex, "
            "choices or grammar as text to the upstream, and this gateway is configured not "
            "to forward them (privacy.forward_structured_outputs).", 400,
            param=structured[0], code="unsupported_parameter")
