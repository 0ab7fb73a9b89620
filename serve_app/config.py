"""The one typed configuration of the gateway (`AppConfig`) and of the reference backend.

Serve validates `serve_config.yaml`'s `args` against these models at deploy time, so a
mistake is reported with the name of the field before any replica starts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEMO_MODEL = "demo"
"""`ModelConfig.source` value that selects the locally built demo checkpoint."""

DEMO_SERVED_NAME = "serve-app-demo"


class StrictModel(BaseModel):
    """Config models reject unknown keys so a typo in the YAML is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(StrictModel):
    source: str = Field(
        DEMO_MODEL,
        description=(
            "`demo` (built locally on first start), a local checkpoint directory, or a "
            "Hugging Face hub id (downloaded where the hub is reachable)."
        ),
    )
    served_name: str | None = Field(
        None,
        description="Model id clients send and /v1/models lists; defaults to the source's name.",
    )
    revision: str | None = Field(None, description="Hub revision, for hub ids only.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Embedding dtype; `auto` keeps the checkpoint's."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when present, else the CPU."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Context length; defaults to the checkpoint's."
    )
    chat_template: str | None = Field(
        None,
        description=(
            "Jinja chat template (the text, or a path to a file holding it) for models "
            "without one, or to replace theirs."
        ),
    )

    @field_validator("source")
    @classmethod
    def _source_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name `demo`, a directory or a hub id")
        return value

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.source == DEMO_MODEL:
            return DEMO_SERVED_NAME
        return self.source.rstrip("/")


class BatchingConfig(StrictModel):
    """Embedder batching; also the embedder's `user_config`, so it changes without a restart."""

    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)


class UpstreamConfig(StrictModel):
    url: str = Field(
        "http://127.0.0.1:8000/reference/v1",
        description="Base URL of the OpenAI-compatible server, up to and including `/v1`.",
    )
    dialect: Literal["vllm", "nim"] = Field(
        "vllm", description="`vllm` sends `prompt_embeds`; `nim` sends `prompt-embeds`."
    )
    model: str | None = Field(
        None, description="Model name the upstream knows; defaults to the served name."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding the upstream's API key."
    )
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(300.0, gt=0, description="Longest silence from the upstream.")
    max_connections: int = Field(256, ge=1)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class LimitsConfig(StrictModel):
    max_embeds_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "Cap on one decoded client tensor; defaults to context x hidden size x 4 bytes."
        ),
    )


class AppConfig(StrictModel):
    """The gateway application's only argument."""

    model: ModelConfig = ModelConfig()
    batching: BatchingConfig = BatchingConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()


class ReferenceBackendConfig(StrictModel):
    """The embedded vLLM-compatible upstream that generates from prompt embeddings."""

    model: ModelConfig = ModelConfig()
    max_tokens_default: int = Field(16, ge=1, description="max_tokens when a request omits it.")
