"""OpenAI `/v1/embeddings` and Cohere `/v2/embed`: requests and answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, field_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

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


@dataclass(frozen=True)
class NumpyArray:
    """`Annotated` metadata for an answer's vectors: a numpy array of `dtype` and rank
    `ndim`, kept as it is.

    Validating or dumping millions of floats one by one costs several times the encoding
    itself, so an array passes validation without a copy or per-element work, and
    `model_dump()` hands it on as it is, for orjson's OPT_SERIALIZE_NUMPY (float32 at its
    shortest). `model_dump_json()` writes it as nested lists; nested lists validate into one.
    """

    dtype: str
    ndim: int

    def __get_pydantic_core_schema__(self, source: Any,
                                     handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self._validate, serialization=core_schema.plain_serializer_function_ser_schema(
                _as_lists, when_used="json"))

    def __get_pydantic_json_schema__(self, schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        item: JsonSchemaValue = {
            "type": "number" if np.dtype(self.dtype).kind == "f" else "integer"}
        for _ in range(self.ndim):
            item = {"type": "array", "items": item}
        return item

    def _validate(self, value: Any) -> npt.NDArray[Any]:
        expected = np.dtype(self.dtype)
        array = np.asarray(value, dtype=expected) if isinstance(value, list) else value
        if not isinstance(array, np.ndarray):
            raise ValueError(f"expected a {self.ndim}-d array of {expected}")
        if array.dtype != expected or array.ndim != self.ndim:
            raise ValueError(f"expected a {self.ndim}-d array of {expected}, got a "
                             f"{array.ndim}-d array of {array.dtype}")
        return array


def _as_lists(array: npt.NDArray[Any]) -> Any:
    return array.tolist()


Float32Vector = Annotated[npt.NDArray[np.float32], NumpyArray("<f4", 1)]
Float32Rows = Annotated[npt.NDArray[np.float32], NumpyArray("<f4", 2)]
Int8Rows = Annotated[npt.NDArray[np.int8], NumpyArray("i1", 2)]
UInt8Rows = Annotated[npt.NDArray[np.uint8], NumpyArray("u1", 2)]


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
