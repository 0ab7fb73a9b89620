"""OpenAI `/v1/embeddings` and Cohere `/v2/embed`: requests and answers."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from serve_app.protocol.base import RequestModel, TokenIds, token_id_shape
from serve_app.protocol.common import ResponseModel


class EmbeddingRequest(RequestModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/embeddings/create
    input: str | list[str] | TokenIds | list[TokenIds]
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = Field(None, description="Ignored: an end-user id.")

    # --- extras (vLLM) ---
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1,
        description="Keep only the first N tokens of each input (-1: the model's limit).",
    )

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return token_id_shape(value, "input")

    def inputs(self) -> list[str] | list[TokenIds]:
        """`input` as a list of texts or of token-id lists (maybe empty)."""
        value: Any = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(RequestModel):
    # Ordered as in https://docs.cohere.com/reference/embed (v2)
    model: str
    texts: list[str] = Field(min_length=1)
    input_type: str | None = Field(
        None, description="search_query, search_document, classification or clustering."
    )
    embedding_types: list[CohereEmbeddingType] = Field(
        default_factory=lambda: list[CohereEmbeddingType](["float"]), min_length=1)
    output_dimension: int | None = Field(None, ge=1)
    truncate: Literal["NONE", "START", "END"] = "END"

    refused: ClassVar[dict[str, str]] = {
        "images": "images are not supported by this gateway",
        "inputs": "mixed inputs are not supported by this gateway; send `texts`",
    }


class Embedding(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    """Floats, or base64 of little-endian float32 (`encoding_format: base64`)."""


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class CohereEmbeddings(ResponseModel):
    """One list per asked type; int8 / uint8 are refused before any vector is made."""

    float_: list[list[float]] | None = Field(None, alias="float")
    binary: list[list[int]] | None = None
    ubinary: list[list[int]] | None = None
    base64: list[str] | None = None


class CohereApiVersion(ResponseModel):
    version: str = "2"


class CohereBilledUnits(ResponseModel):
    input_tokens: int


class CohereMeta(ResponseModel):
    api_version: CohereApiVersion = CohereApiVersion()
    billed_units: CohereBilledUnits


class CohereEmbedResponse(ResponseModel):
    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
