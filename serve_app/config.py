"""The one typed configuration of the gateway (`AppConfig`) and of the reference upstream.

Serve validates `serve_config.yaml`'s `args` against these models at deploy time, so a
mistake is reported with the name of the field before any replica starts. One module on
purpose, longer than most: it reads top to bottom as `docs/configuration.md`, which is
generated from it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEMO_MODEL = "demo"
"""`ModelConfig.source` value that selects the locally built demo checkpoint."""

DEMO_SERVED_NAME = "serve-app-demo"

DEMO_ENCODER = "demo-encoder"
"""`EmbeddingModelConfig.source` value that selects the locally built demo encoder."""

DEMO_ENCODER_SERVED_NAME = "serve-app-demo-embed"


class StrictModel(BaseModel):
    """Config models reject unknown keys so a typo in the YAML is an error, not a no-op."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AdapterConfig(StrictModel):
    """A PEFT prompt adapter (soft prompt) served under a model name of its own
    (docs/adapters.md)."""

    name: str = Field(
        description="Model id clients send to select it; /v1/models lists it with `parent` "
        "the served model.",
    )
    path: str = Field(
        description="The folder PEFT's `save_pretrained` wrote: `adapter_config.json` "
        "(`peft_type` PROMPT_TUNING or P_TUNING) and `adapter_model.safetensors`, or "
        "`adapter_model.bin` (read with torch's weights-only loader; pickled objects are "
        "refused).",
    )

    @field_validator("name", "path")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class ModelConfig(StrictModel):
    """The LLM the upstream serves: the gateway tokenizes with it and reads only its
    input-embedding matrix."""

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
    adapters: list[AdapterConfig] = Field(
        default_factory=list,
        description="Prompt-tuning and P-tuning adapters of this model: each one's virtual "
        "tokens lead every prompt of a request that names it. Each takes virtual tokens x "
        "hidden size x the dtype's bytes on the Embedder's device and in each ingress "
        "replica's memory. Also in the Embedder's and the Gateway's `user_config`: an "
        "override there changes them in place (docs/adapters.md).",
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
    """Embedder batching; also in the Embedder's `user_config`, so it changes without a
    restart."""

    max_batch_size: int = Field(
        16, ge=1, le=1024, description="Most prompts one Embedder batch looks up at once."
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, le=10.0,
        description="How long a batch waits for more prompts after its first. With 0 a "
        "batch takes the prompts that queued while the last one ran: no wait when idle, "
        "full batches under load (docs/performance.md).",
    )


class AdaptersUserConfig(StrictModel):
    """The Gateway's `user_config`: its prompt adapters, applied in place (docs/adapters.md)."""

    adapters: list[AdapterConfig] | None = Field(
        None, description="The adapters served; absent, those of `args.model.adapters`.")


class EmbedderUserConfig(BatchingConfig):
    """The Embedder's `user_config`: its batching and its prompt adapters, both applied in
    place (docs/adapters.md)."""

    adapters: list[AdapterConfig] | None = Field(
        None, description="The adapters served; absent, those of `args.model.adapters`.")


class AutoscalingConfig(StrictModel):
    """Serve's `autoscaling_config` for a batched deployment: replicas are added while the
    requests per replica stay above the target."""

    min_replicas: int = Field(1, ge=0, le=1024, description="Fewest replicas kept running.")
    max_replicas: int = Field(2, ge=1, le=1024, description="Most replicas Serve starts.")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="Requests per replica Serve scales towards: about half a "
        "batch, so a replica is added before batches wait for one another.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class BackendConfig(StrictModel):
    """One NIM or vLLM server of the upstream fleet."""

    url: str = Field(
        "http://127.0.0.1:8000/reference/v1",
        description="Base URL of the OpenAI-compatible server, up to and including `/v1`.",
    )
    dialect: Literal["vllm", "nim"] = Field(
        "vllm", description="`vllm` sends `prompt_embeds`; `nim` sends `prompt-embeds`."
    )
    model: str | None = Field(
        None, description="Model name this server knows; defaults to the served name."
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding this server's API key."
    )
    weight: float = Field(
        1.0, gt=0, description="Share of traffic relative to the others at equal load."
    )
    max_in_flight: int = Field(
        64, ge=1,
        description="Requests one Dispatcher replica keeps open to this server at once.",
    )
    health_url: str | None = Field(
        None,
        description="GET probed for health; defaults to `<url>/models`. vLLM also has "
                    "`/health` at its root, NIM `/v1/health/ready`.",
    )

    @field_validator("url", "health_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @property
    def probe_url(self) -> str:
        return self.health_url or f"{self.url}/models"


class UpstreamTimeouts(StrictModel):
    """Each limit ends the request with a 504 (or, once streaming, an error event)."""

    connect_s: float = Field(5.0, gt=0, description="TCP (and TLS) connect, per attempt.")
    first_token_s: float = Field(
        120.0, gt=0,
        description="Streams: from sending the request to the first event, per attempt.",
    )
    idle_s: float = Field(60.0, gt=0, description="Streams: longest gap between events.")
    total_s: float = Field(
        600.0, gt=0,
        description="The whole request: waiting for a slot, every attempt, the answer.",
    )


class RetryConfig(StrictModel):
    """Failover before the first byte of the answer; never once it has gone to the client."""

    max_attempts: int = Field(
        3, ge=1, le=16, description="Attempts per request, each on a different backend."
    )
    max_retry_after_s: float = Field(
        60.0, ge=0, description="Longest Retry-After of a 429 that keeps a backend aside."
    )


class HealthConfig(StrictModel):
    """Active probes and passive ejection; an ejected backend is probed before readmission."""

    probe_interval_s: float = Field(5.0, gt=0, description="Time between active probes.")
    probe_timeout_s: float = Field(
        2.0, gt=0, description="Time a probe may take before it counts as failed."
    )
    failure_threshold: int = Field(
        3, ge=1,
        description="Consecutive failures (connect errors, 5xx, timeouts, failed probes) "
                    "that eject a backend.",
    )
    cooldown_s: float = Field(
        10.0, gt=0, description="Time out of rotation before the half-open probe."
    )
    max_cooldown_s: float = Field(
        120.0, gt=0, description="Cap on the cooldown, which doubles on each failed probe."
    )


class RoutingConfig(StrictModel):
    """How a request picks its backend (docs/fleet.md#routing).

    `least_loaded` draws two healthy backends by weight and takes the less loaded one.
    `prefix_affinity` sends every request whose first `prefix_blocks` blocks of
    `block_size` prompt rows are equal to the same backend, so that backend's prefix cache
    serves them; a backend loaded beyond `load_bound` yields to the key's next choice.
    """

    policy: Literal["least_loaded", "prefix_affinity"] = Field(
        "prefix_affinity",
        description="`prefix_affinity`: requests sharing a prompt prefix go to one backend; "
                    "`least_loaded`: power of two choices on in-flight per unit of weight.",
    )
    block_size: int = Field(
        16, ge=1, le=1024,
        description="Prompt rows per hashed block; vLLM's KV block size (16 by default).",
    )
    prefix_blocks: int = Field(
        8, ge=1, le=256,
        description="Blocks of the prompt's start that form its routing key; prompts "
                    "shorter than one block are routed by load.",
    )
    load_bound: float = Field(
        0.1, ge=0,
        description="ε of bounded loads: a backend with more than (1 + ε) x the fleet's "
                    "mean in-flight per unit of weight passes the request to the next "
                    "choice for its prefix.",
    )


class UpstreamConfig(StrictModel):
    """The upstream fleet: also the Dispatcher's `user_config`, so it changes in place."""

    backends: list[BackendConfig] = Field(
        default_factory=lambda: [BackendConfig()], min_length=1,
        description="The servers of the model; `routing` picks one healthy server per request.",
    )
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    retry: RetryConfig = RetryConfig()
    health: HealthConfig = HealthConfig()
    routing: RoutingConfig = RoutingConfig()
    max_queue_wait_s: float = Field(
        5.0, ge=0,
        description="How long a request waits when every backend is at `max_in_flight`, "
                    "or for room in `payload_budget_bytes`; then a 429 with Retry-After.",
    )
    payload_budget_bytes: int = Field(
        2 << 30, ge=1 << 20,
        description="Most bytes of encoded prompt embeddings (base64) one Dispatcher "
                    "replica holds at once, counted from before the Embedder makes them "
                    "until a stream's first event or a whole answer; a request larger than "
                    "this runs alone. What the Embedders return waits in Ray's object store "
                    "within it, so the Dispatcher replicas x this bounds the store's use "
                    "(docs/performance.md).",
    )

    @model_validator(mode="after")
    def _unique_urls(self) -> UpstreamConfig:
        urls = [backend.url for backend in self.backends]
        duplicates = sorted({url for url in urls if urls.count(url) > 1})
        if duplicates:
            raise ValueError(f"backend urls must be unique: {', '.join(duplicates)}")
        return self


PROMPT_TOKENS_FLOOR = 65536
"""`limits.max_prompt_tokens` for a model whose context is shorter."""


class LimitsConfig(StrictModel):
    """Caps checked before any heavy work; each refusal names its limit."""

    max_embeds_bytes: int | None = Field(
        None,
        ge=1,
        description=(
            "Cap on one decoded client tensor; defaults to context x hidden size x 4 bytes."
        ),
    )
    max_body_bytes: int = Field(
        64 << 20, ge=1024, description="Largest request body; larger ones get 413."
    )
    max_items: int = Field(
        2048, ge=1,
        description="Most prompts / embeddings / messages / embedding inputs in one request.",
    )
    max_text_chars: int = Field(
        2 << 20, ge=1,
        description="Most characters of text one request may have the gateway tokenize, "
        "over all its prompts, messages, embedding inputs and template variables, counted "
        "after truncation has cut them (prompts.text_budget); beyond, a 400 before any is "
        "tokenized. Tokenizing runs at roughly 0.1 to 1 MB/s a core: the default bounds "
        "one request to seconds of ingress CPU (benchmarks/results/worst_request_*.md).",
    )
    max_n: int = Field(16, ge=1, description="Most samples (`n`) per prompt.")
    max_concurrent_requests: int = Field(
        256, ge=1,
        description="API requests one ingress replica serves at once; beyond, an OpenAI 429.",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on `max_tokens`; the model's context by default."
    )
    max_prompt_tokens: int | None = Field(
        None, ge=1,
        description="Most prompt tokens (embedding rows) one request sends upstream, over "
        f"all its prompts; defaults to the larger of the context and {PROMPT_TOKENS_FLOOR} "
        "(512 MiB of embeddings at hidden size 4096 in bf16).",
    )
    max_logprobs: int = Field(
        20, ge=0, le=1024,
        description="Cap on `logprobs` (completions) and `top_logprobs` (chat), as vLLM's.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600,
        description="Time a client has to send its whole request body; then a 408. Requests "
        "still sending hold no slot of max_concurrent_requests.",
    )
    max_receiving_requests: int = Field(
        768, ge=0,
        description="Requests one ingress replica holds while their bodies arrive, beside "
        "max_concurrent_requests (Serve's max_ongoing_requests is the sum).",
    )

    def prompt_tokens_cap(self, context: int) -> int:
        """`max_prompt_tokens`, or its default for a model of this context."""
        return self.max_prompt_tokens or max(context, PROMPT_TOKENS_FLOOR)


TransformKind = Literal["none", "gaussian", "keyed_gaussian", "module"]


class TransformConfig(StrictModel):
    """What the Embedder does to prompt embeddings before they leave (docs/privacy.md).

    Raw rows are invertible by anyone holding the model's weights; `serve-app-audit`
    measures what each choice leaves recoverable and what it costs in answer quality.
    """

    kind: TransformKind = Field(
        "none", description="`none`: raw rows (invertible); `gaussian`: fresh noise per "
        "request; `keyed_gaussian`: noise fixed by a secret key, these parameters, the "
        "client's tenant and the token prefix, so a tenant's identical prefixes give "
        "identical rows (vLLM's prefix cache keeps working) and repeating a request cannot "
        "average it away; `module`: an operator's torch module.",
    )
    sigma: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Noise scale, in units of the embedding matrix's standard deviation "
        "(`gaussian`, `keyed_gaussian`).",
    )
    key_env: str | None = Field(
        None, description="Environment variable holding the secret key of `keyed_gaussian` "
        "(at least 16 characters); the key itself is never in this file.",
    )
    tenant: Literal["api_key", "shared"] = Field(
        "api_key", description="Whose prompts share `keyed_gaussian` rows. `api_key`: each "
        "accepted API key (`auth`) is a tenant, so requests under one key never reproduce "
        "another key's rows, and vLLM's prefix cache is shared only within a key; with no "
        "`auth` configured every client is one tenant. `shared`: every client is one tenant.",
    )
    module: str | None = Field(
        None, description="`package.module:Class` of a `torch.nn.Module` mapping "
        "`(rows, hidden)` to the same shape, dtype and device (`module`).",
    )
    module_args: dict[str, int | float | str | bool] = Field(
        default_factory=dict, description="Keyword arguments the module's class is built with.",
    )
    module_weights: str | None = Field(
        None, description="The module's state dict as a `.safetensors` file (never a pickle).",
    )
    module_token_ids: bool = Field(
        False, description="Also pass the rows' token ids (`-1` for client rows) to the "
        "module's `forward(rows, token_ids)`.",
    )
    apply_to_client_embeds: bool = Field(
        False, description="Transform client-sent `prompt_embeds` too. Off by default: "
        "clients that send embeddings chose them (perhaps already transformed, with "
        "`serve_app.client`), and noise on top would cost quality twice.",
    )
    apply_to_adapters: bool = Field(
        True, description="Transform the virtual tokens' rows of `model.adapters` as text "
        "rows are. Off: they go upstream as trained, which tells the upstream which adapter "
        "a request chose (docs/adapters.md).",
    )

    @model_validator(mode="after")
    def _complete(self) -> TransformConfig:
        if self.kind == "keyed_gaussian" and not self.key_env:
            raise ValueError("keyed_gaussian needs key_env, the variable holding its key")
        if self.kind == "module" and not self.module:
            raise ValueError("kind module needs module, as package.module:Class")
        if self.module_weights and not self.module_weights.endswith(".safetensors"):
            raise ValueError("module_weights must be a .safetensors file (pickles are refused)")
        return self


class PrivacyConfig(StrictModel):
    """What of the prompt may reach the upstream: the embeddings' transform, and which
    client text may travel beside them (docs/privacy.md, docs/upstream-fields.md)."""

    transform: TransformConfig = TransformConfig()

    forward_stop: bool = Field(
        False, description="Forward `stop` strings (bounded) for the upstream to apply. "
        "False: they never leave the gateway, which streams every such answer from the "
        "upstream, cuts each choice at its first stop string as vLLM does, and closes the "
        "upstream request once every choice has stopped.",
    )
    stop_token_ids: bool = Field(
        False, description="With `forward_stop` false: also send the upstream the token id "
        "of each stop string that is exactly one token (in `stop_token_ids`), so it stops "
        "there itself rather than about one token later, when the gateway closes the "
        "request (benchmarks/stop_overrun.py). The id names that token of the client's "
        "text, so it is off by default.",
    )
    forward_structured_outputs: bool = Field(
        False, description="Forward structured-output constraints (JSON schemas, regexes, "
        "choices, grammars), which carry text; false refuses them with a 400.",
    )


TurnMarkerPolicy = Literal["escape", "refuse", "allow"]


class TokenizationConfig(StrictModel):
    """How client text becomes token ids."""

    chat_turn_markers: TurnMarkerPolicy = Field(
        "escape", description="Text in messages or template variables that spells one of "
        "the chat template's turn markers (found at start: its special tokens and tags such "
        "as `[INST]`): `escape` inserts a zero-width space (a middle dot where the "
        "tokenizer drops it) after the marker's first character; `refuse` answers 400 "
        "naming where it is; `allow` leaves it, so a message can write turns of its own. "
        "With escape or refuse, a chat whose token ids still hold a marker more often "
        "than its turns put there is a 400 (docs/security.md).",
    )
    chat_special_tokens: Literal["text", "parse"] = Field(
        "text", description="`text`: special-token strings typed in messages are tokenized "
        "as plain text, never as the tokenizer's special tokens; `parse`: they become the "
        "tokenizer's special tokens (vLLM's behaviour).",
    )
    completion_special_tokens: Literal["text", "parse"] = Field(
        "parse", description="The same for completions prompts; `parse` is vLLM's behaviour.",
    )


class AuthConfig(StrictModel):
    """Bearer keys for the ingress: never in this file, only where to find them."""

    api_keys_env: str | None = Field(
        None, description="Environment variable holding the accepted keys, comma-separated; "
        "whitespace around a key is ignored, whitespace inside one stops the start.",
    )
    api_keys_file: str | None = Field(
        None, description="File (e.g. a mounted secret) holding the accepted keys, one per "
        "line; blank lines and `#` comment lines are skipped, and a line with whitespace "
        "inside stops the start (its number is named, never its content).",
    )

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys_env or self.api_keys_file)


class EncoderBatchingConfig(StrictModel):
    """Encoder batching by token budget; the encoder's `user_config` (no restart to change)."""

    max_batch_tokens: int = Field(
        8192, ge=1, le=1 << 22,
        description="Padded tokens per forward pass; at least the model's max sequence length.",
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, le=10.0,
        description="How long a batch waits for more inputs after its first.",
    )


class EmbeddingModelConfig(StrictModel):
    """A sentence-embedding model served on `/v1/embeddings` and `/v2/embed`."""

    source: str = Field(
        DEMO_ENCODER,
        description="`demo-encoder` (built locally), a local directory, or a hub id.",
    )
    served_name: str | None = Field(None, description="Model id clients send.")
    revision: str | None = Field(None, description="Hub revision, for hub ids only.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights' dtype; `auto` keeps the checkpoint's."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="`auto` uses CUDA when present, else the CPU."
    )
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto",
        description="`auto` follows the checkpoint's sentence-transformers files, else mean.",
    )
    normalize: bool | None = Field(
        None, description="L2-normalise; defaults to the checkpoint's (true without ST files)."
    )
    matryoshka_dimensions: list[int] | None = Field(
        None, description="Dimensions `dimensions` may ask for; else the checkpoint's, if any."
    )
    max_model_len: int | None = Field(None, ge=1, description="Longest input in tokens.")
    truncate: bool = Field(
        False, description="Cut over-long inputs (at the end) instead of refusing them."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template (the text, or a path to a file holding it) "
        "for `messages` on /v1/embeddings; the tokenizer's own by default.",
    )
    calibration_file: str | None = Field(
        None, description="UTF-8 texts, one a line (2 to 1000 non-blank lines, at most 4 MiB; "
        "else the gateway does not start), whose embeddings give the per-dimension ranges of "
        "Cohere's `int8` and `uint8`, computed in the background from the gateway's start; "
        "a built-in sample of 128 sentences by default.",
    )
    batching: EncoderBatchingConfig = EncoderBatchingConfig()
    autoscaling: AutoscalingConfig = Field(
        AutoscalingConfig(), description="This model's Encoder replicas.")

    @property
    def name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.source == DEMO_ENCODER:
            return DEMO_ENCODER_SERVED_NAME
        return self.source.rstrip("/")


class AppConfig(StrictModel):
    """The gateway application's only argument."""

    model: ModelConfig = ModelConfig()
    embedding_models: list[EmbeddingModelConfig] = Field(
        default_factory=list, description="Sentence-embedding models served beside `model`."
    )
    batching: BatchingConfig = BatchingConfig()
    autoscaling: AutoscalingConfig = Field(
        AutoscalingConfig(), description="The Embedder replicas (prompt embeddings).")
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    tokenization: TokenizationConfig = TokenizationConfig()

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = ([self.model.name] + [a.name for a in self.model.adapters]
                 + [m.name for m in self.embedding_models])
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"served model names must be unique: {', '.join(duplicates)}")
        return self


class ReferenceConfig(StrictModel):
    """The embedded vLLM-compatible upstream that generates from prompt embeddings."""

    model: ModelConfig = Field(
        ModelConfig(), description="The checkpoint it generates with: the gateway's `model`, "
        "so the embeddings it receives come from its own embedding table."
    )
    max_tokens_default: int = Field(16, ge=1, description="max_tokens when a request omits it.")
