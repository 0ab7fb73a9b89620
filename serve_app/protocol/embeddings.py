"""OpenAI `/v1/embeddings` and Cohere `/v2/embed`: requests and answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    field_validator,
)

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


def _array(dtype: str, ndim: int) -> Callable[[Any], npt.NDArray[Any]]:
    """A validator that takes a numpy array of `dtype` and rank `ndim` as it is (no copy, no
    per-element work), and nested lists as such an array."""
    expected = np.dtype(dtype)

    def validate(value: Any) -> npt.NDArray[Any]:
        array = np.asarray(value, dtype=expected) if isinstance(value, list) else value
        if not isinstance(array, np.ndarray):
            raise ValueError(f"expected a {ndim}-d array of {expected}")
        if array.dtype != expected or array.ndim != ndim:
            raise ValueError(f"expected a {ndim}-d array of {expected}, got a {array.ndim}-d "
                             f"array of {array.dtype}")
        return array

    return validate


def _array_schema(ndim: int, item: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": item}
    for _ in range(ndim):
        schema = {"type": "array", "items": schema}
    return schema


# Vectors stay numpy arrays in the answer models: validating or dumping millions of floats
# one by one costs several times the encoding itself. `model_dump()` hands the arrays on
# as they are, for orjson's OPT_SERIALIZE_NUMPY (float32 at its shortest repr);
# `model_dump_json()` writes them as lists.
Float32Vector = Annotated[
    npt.NDArray[np.float32], PlainValidator(_array("<f4", 1)),
    PlainSerializer(lambda array: array.tolist(), when_used="json"),
    WithJsonSchema(_array_schema(1, "number"))]
Float32Rows = Annotated[
    npt.NDArray[np.float32], PlainValidator(_array("<f4", 2)),
    PlainSerializer(lambda array: array.tolist(), when_used="json"),
    WithJsonSchema(_array_schema(2, "number"))]
Int8Rows = Annotated[
    npt.NDArray[np.int8], PlainValidator(_array("i1", 2)),
    PlainSerializer(lambda array: array.tolist(), when_used="json"),
    WithJsonSchema(_array_schema(2, "integer"))]
UInt8Rows = Annotated[
    npt.NDArray[np.uint8], PlainValidator(_array("u1", 2)),
    PlainSerializer(lambda array: array.tolist(), when_used="json"),
    WithJsonSchema(_array_schema(2, "integer"))]


class Embedding(ResponseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: str | Float32Vector
    """Base64 of little-endian float32 (`encoding_format: base64`), or the floats."""


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class CohereEmbeddings(ResponseModel):
    """One array per asked type, a row per text; int8 / uint8 are refused before any vector
    is made. Types not asked for are left out of the answer, as Cohere leaves them."""

    # `float` is a builtin's name: the field is `float_`, sent as `float`.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    float_: Float32Rows | None = Field(None, alias="float")
    binary: Int8Rows | None = None
    ubinary: UInt8Rows | None = None
    base64: list[str] | None = None


class CohereApiVersion(ResponseModel):
    version: str = "2"


class CohereBilledUnits(ResponseModel):
    input_tokens: int


class CohereMeta(ResponseModel):
    api_version: CohereApiVersion = CohereApiVersion()
    billed_units: CohereBilledUnits


class CohereEmbedResponse(ResponseModel):
    # Ordered as in https://docs.cohere.com/reference/embed (v2, `embeddings_by_type`)
    id: str
    embeddings: CohereEmbeddings
    texts: list[str]
    meta: CohereMeta
    response_type: Literal["embeddings_by_type"] = "embeddings_by_type"
