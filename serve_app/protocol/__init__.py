"""The OpenAI and Cohere APIs as pydantic models: every request the gateway accepts and
every answer it gives, one module per API, fields in the API references' order.

Each request field is one of:
- **forwarded**: a sampling parameter of `SamplingFields`, the only part of a request that
  reaches an upstream beside the embeddings;
- **used here**: prompts, messages and template options, turned into embeddings in the
  gateway;
- **dropped**: identifiers OpenAI clients send routinely (`user`, `metadata`, ...); accepted,
  never forwarded;
- **refused**: a 400 naming the field and why (it would carry text upstream, or the gateway
  does not serve it).
`docs/upstream-fields.md` holds the whole table.
"""

from serve_app.protocol.base import RequestModel, TokenIds
from serve_app.protocol.chat import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    EmbedsPart,
    TextPart,
)
from serve_app.protocol.common import (
    SSE_DONE,
    ErrorResponse,
    ModelCard,
    ModelList,
    ResponseModel,
    UsageInfo,
)
from serve_app.protocol.completions import (
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from serve_app.protocol.embeddings import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    EmbeddingRequest,
    EmbeddingResponse,
)
from serve_app.protocol.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingFields

__all__ = [
    "MAX_STOP_CHARS", "MAX_STOP_STRINGS", "SSE_DONE", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatMessage", "CohereEmbedRequest",
    "CohereEmbedResponse", "CompletionRequest", "CompletionResponse",
    "CompletionStreamResponse", "EmbeddingRequest", "EmbeddingResponse", "EmbedsPart",
    "ErrorResponse", "ModelCard", "ModelList", "RequestModel", "ResponseModel",
    "SamplingFields", "TextPart", "TokenIds", "UsageInfo",
]
