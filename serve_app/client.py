"""The client-side encoder: prompts become prompt embeddings on the user's own machine, for
users who trust neither the gateway's host nor the upstream.

`PromptEncoder` does what the gateway does to text, with the gateway's own parts: the
tokenizer and chat template (`prompts.chat_template`), the input-embedding matrix read alone
from the safetensors files, the transform (`prompts.transforms`), and vLLM's base64 wire
format. `complete` and `acomplete` send the result through the official OpenAI SDK in
either spelling (`prompt_embeds`, vLLM's; `prompt-embeds`, NIM's), to the gateway or
straight to vLLM/NIM. The SDK is only needed by whoever calls them.

    import openai
    from serve_app.client import PromptEncoder, complete

    encoder = PromptEncoder.from_pretrained("meta-llama/Llama-3.1-8B-Instruct")
    client = openai.OpenAI(base_url="http://localhost:8000/v1", api_key="EMPTY")
    answer = complete(client, encoder, model="meta-llama/Llama-3.1-8B-Instruct",
                      messages=[{"role": "user", "content": "Hello"}], max_tokens=32)

Layer: above `api`, below the deployments; it uses `config`, `protocol` and `prompts`, and
no module of the package imports it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from serve_app.config import ModelConfig, TokenizationConfig, TransformConfig
from serve_app.errors import GatewayError, to_gateway_error
from serve_app.prompts.chat_template import ChatTemplate, load_chat_template
from serve_app.prompts.checkpoint import (
    ModelSpec,
    load_tokenizer,
    read_model_spec,
    resolve_model_dir,
)
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.tenants import SHARED_TENANT
from serve_app.protocol import ChatCompletionRequest

if TYPE_CHECKING:
    import openai
    from openai.types import Completion

Spelling = Literal["prompt_embeds", "prompt-embeds"]
"""The request field that carries the embeddings: vLLM's spelling, or NIM's."""

SPELLINGS: tuple[Spelling, ...] = ("prompt_embeds", "prompt-embeds")


class PromptEncoder:
    """Text and chat messages to the base64 prompt embeddings the gateway would send.

    `tenant` is whose keyed rows to make (`keyed_gaussian` rows depend on it):
    `prompts.tenants.api_key_tenant(key)` gives those a gateway with
    `privacy.transform.tenant: api_key` sends for requests under `key`; `SHARED_TENANT`
    (the default) those of a gateway without `auth`, or with `tenant: shared`.
    """

    def __init__(self, tokenizer: Any, embedder: EmbedderCore, spec: ModelSpec,
                 chat_template: str | None = None,
                 tokenization: TokenizationConfig | None = None,
                 tenant: str = SHARED_TENANT) -> None:
        tokenization = tokenization or TokenizationConfig()
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.spec = spec
        self.tenant = tenant
        self.split_special_tokens = tokenization.completion_special_tokens == "text"
        self.chat = ChatTemplate(tokenizer, chat_template, special_tokens_as_text=(
            tokenization.chat_special_tokens == "text"),
            turn_markers=tokenization.chat_turn_markers)

    @classmethod
    def from_pretrained(
        cls, source: str | Path, transform: TransformConfig | None = None, *,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        revision: str | None = None, chat_template: str | None = None,
        device: Literal["auto", "cpu", "cuda"] = "cpu",
        tokenization: TokenizationConfig | None = None, tenant: str = SHARED_TENANT,
    ) -> PromptEncoder:
        """The encoder of a checkpoint: `demo`, a local directory or a hub id (its
        safetensors and configs are downloaded). Reads the tokenizer, `config.json` and the
        input-embedding matrix, never the rest of the weights.

        `transform`, `chat_template` and `tokenization` take the gateway's config sections
        (`privacy.transform`, `model.chat_template`, `tokenization`): with the same values
        (and, for keyed rows, the same key and `tenant`) the encoder sends what that
        gateway would.
        """
        config = ModelConfig(source=str(source), revision=revision, dtype=dtype,
                             device=device, chat_template=chat_template)
        model_dir = resolve_model_dir(config)
        return cls(load_tokenizer(model_dir),
                   EmbedderCore.from_checkpoint(model_dir, config, transform),
                   read_model_spec(model_dir, config),
                   load_chat_template(config.chat_template), tokenization, tenant)

    def token_ids(self, prompt: str | Sequence[int], *,
                  add_special_tokens: bool = True) -> list[int]:
        """The prompt's token ids, as the gateway's `/v1/completions` tokenizes them."""
        if isinstance(prompt, str):
            encoded = self.tokenizer([prompt], add_special_tokens=add_special_tokens,
                                     split_special_tokens=self.split_special_tokens)
            return self._checked(list(encoded.input_ids[0]))
        return self._checked(list(prompt))

    def chat_token_ids(self, messages: Sequence[Mapping[str, Any]], *,
                       add_generation_prompt: bool = True, continue_final_message: bool = False,
                       chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """The templated messages' token ids, as the gateway's `/v1/chat/completions`
        renders them. Text content only: a `prompt_embeds` part is refused."""
        try:
            request = ChatCompletionRequest.model_validate({
                "model": "client", "messages": list(messages),
                "add_generation_prompt": add_generation_prompt,
                "continue_final_message": continue_final_message,
                "chat_template_kwargs": chat_template_kwargs})
            rendered = self.chat.render(request)
        except (GatewayError, ValidationError) as exc:  # its refusals, worded for an API
            raise ValueError(to_gateway_error(exc).message) from None
        if rendered.embeds:
            raise ValueError("encode_chat takes text content only; send prompt_embeds parts "
                             "to the gateway as they are")
        return self._checked([i for run in rendered.segments if isinstance(run, list)
                              for i in run])

    def encode(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> str:
        """A completions prompt (text, or token ids) as base64 prompt embeddings."""
        return self._encoded(self.token_ids(prompt, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None) -> str:
        """Chat messages, templated, as base64 prompt embeddings for `/v1/completions`."""
        return self._encoded(self.chat_token_ids(
            messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs))

    def _checked(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("the prompt has no tokens")
        if any(not 0 <= i < self.spec.vocab_size for i in ids):
            raise ValueError(f"token ids must lie in [0, {self.spec.vocab_size})")
        return ids

    def _encoded(self, ids: list[int]) -> str:
        [encoded] = self.embedder.embed_batch([ids], [self.tenant])
        return encoded.data.decode("ascii")


def _request(encoder: PromptEncoder, model: str, prompt: str | Sequence[int] | None,
             messages: Sequence[Mapping[str, Any]] | None, spelling: Spelling,
             params: dict[str, Any]) -> dict[str, Any]:
    """`completions.create`'s arguments: an empty prompt beside the embeddings, as vLLM's
    examples send them (the SDK requires `prompt`; vLLM and NIM read "" as none)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass either prompt or messages")
    if spelling not in SPELLINGS:
        raise ValueError(f"spelling must be one of {', '.join(SPELLINGS)}")
    if params.get("stream"):
        raise ValueError("complete() returns whole answers; to stream, pass encode()'s "
                         "output in extra_body to completions.create yourself")
    embeds = (encoder.encode(prompt) if prompt is not None
              else encoder.encode_chat(messages or []))
    extra_body = {**(params.pop("extra_body", None) or {}), spelling: embeds}
    return {**params, "model": model, "prompt": "", "extra_body": extra_body}


def complete(client: openai.OpenAI, encoder: PromptEncoder, *, model: str,
             prompt: str | Sequence[int] | None = None,
             messages: Sequence[Mapping[str, Any]] | None = None,
             spelling: Spelling = "prompt_embeds", **params: Any) -> Completion:
    """Encode `prompt` (or templated `messages`) here and send only the embeddings to
    `/v1/completions`; `params` are the SDK's (`max_tokens`, `temperature`, ...)."""
    arguments = _request(encoder, model, prompt, messages, spelling, dict(params))
    completion: Completion = client.completions.create(**arguments)
    return completion


async def acomplete(client: openai.AsyncOpenAI, encoder: PromptEncoder, *, model: str,
                    prompt: str | Sequence[int] | None = None,
                    messages: Sequence[Mapping[str, Any]] | None = None,
                    spelling: Spelling = "prompt_embeds", **params: Any) -> Completion:
    """`complete` for the async SDK; the encoding runs in a worker thread."""
    arguments = await asyncio.to_thread(_request, encoder, model, prompt, messages,
                                        spelling, dict(params))
    completion: Completion = await client.completions.create(**arguments)
    return completion
