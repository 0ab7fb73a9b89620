"""OpenAI `/v1/embeddings` and Cohere `/v2/embed`: requests and answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from serve_app.errors import InvalidField
from serve_app.protocol.base import RequestModel, TokenIds, token_id_shape
from serve_app.protocol.chat import ChatMessage, known_part_types
from serve_app.protocol.common import ResponseModel

# vLLM's `serial_utils` names, in its order.
EncodingFormat = Literal["float", "base64", "bytes", "bytes_only"]
EmbedDType = Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"]
Endianness = Literal["native", "big", "little"]


class EmbeddingMessage(ChatMessage):
    """A chat message to embed: text parts only (an encoder has no use for a
    `prompt_embeds` part, and images are not served)."""

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, content: Any) -> Any:
        return known_part_types(content, ("text",), "/v1/embeddings takes `text` parts")


# Options that shape how `messages` are templated; `input` has no template to shape.
_CHAT_OPTIONS = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs")


class EmbeddingRequest(RequestModel):
    # Ordered as in https://platform.openai.com/docs/api-reference/embeddings/create
    input: str | list[str] | TokenIds | list[TokenIds] | None = None
    model: str
    dimensions: int | None = Field(None, ge=1)
    encoding_format: EncodingFormat = "float"
    user: str | None = Field(None, description="Ignored: an end-user id.")

    # --- extras (vLLM) ---
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1,
        description="Keep only the first N tokens of each input (-1: the model's limit); "
                    "more than the model's limit is a 400.",
    )
    embed_dtype: EmbedDType = Field(
        "float32", description="The element type of base64 and bytes answers.")
    endianness: Endianness = Field(
        "native", description="The byte order of base64 and bytes answers (native: the "
                              "server's).")
    use_activation: bool | None = Field(
        None, description="False: the pooled vectors, not normalised (None: the model's "
                          "default).")
    normalize: bool | None = Field(
        None, description="vLLM's older name for use_activation; it wins when both are set.")
    messages: list[EmbeddingMessage] | None = Field(
        None, min_length=1, description="Instead of `input`: one chat, templated with the "
        "model's chat template and embedded as one input (vLLM's chat embeddings).")
    add_generation_prompt: bool = Field(
        False, description="With `messages`: end with the template's assistant header.")
    continue_final_message: bool = Field(
        False, description="With `messages`: leave the last message open.")
    add_special_tokens: bool | None = Field(
        None, description="With `messages`: add the tokenizer's special tokens (CLS and SEP, "
        "or BOS) around the templated chat (default false). With `input` they are always "
        "added: false is a 400.")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="With `messages`: extra variables for the chat template.")

    refused: ClassVar[dict[str, str]] = {
        "chat_template": "chat templates are the server's own "
                         "(embedding_models[].chat_template)",
        "mm_processor_kwargs": "multimodal inputs are not supported by this gateway",
        "media_io_kwargs": "multimodal inputs are not supported by this gateway",
    }

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        return token_id_shape(value, "input")

    @model_validator(mode="after")
    def _input_or_messages(self) -> EmbeddingRequest:
        if (self.input is None) == (self.messages is None):
            raise InvalidField("input" if self.input is None else "messages",
                               "Send either input or messages.")
        if self.messages is not None:
            if self.add_generation_prompt and self.continue_final_message:
                raise InvalidField("continue_final_message", "add_generation_prompt and "
                                   "continue_final_message exclude each other.")
            return self
        chat_only = [name for name in _CHAT_OPTIONS if name in self.model_fields_set]
        if self.add_special_tokens is False:
            chat_only.append("add_special_tokens")
        if chat_only:
            raise InvalidField(chat_only[0], "{param} applies only to messages.",
                               code="unsupported_parameter")
        return self

    def normalises(self, model_default: bool) -> bool:
        """Whether the vectors are L2-normalised, as vLLM's `get_use_activation` decides:
        `normalize` when set, then `use_activation`, else the model's default."""
        for choice in (self.normalize, self.use_activation):
            if choice is not None:
                return choice
        return model_default

    def inputs(self) -> list[str] | list[TokenIds]:
        """`input` as a list of texts or of token-id lists (maybe empty)."""
        value: Any = self.input
        if value is None:
            return []
        return list(value) if self.input_listed else [value]

    @property
    def input_listed(self) -> bool:
        """Whether `input` lists its inputs (texts or token-id lists), each then named by
        its index (`input.2`), rather than being one text or one token-id list."""
        value = self.input
        return isinstance(value, list) and not (value and isinstance(value[0], int))


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
    """Base64 of the vector in `embed_dtype` and `endianness` (by default float32 in the
    server's order, little-endian here: what the OpenAI SDK decodes), or the floats."""


class EmbeddingUsage(ResponseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = Field(0, description="Always 0, as vLLM's UsageInfo sends it.")


class EmbeddingResponse(ResponseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class CohereEmbeddings(ResponseModel):
    """One array per asked type, a row per text (int8 / uint8 quantized with the model's
    calibrated ranges: `sentence.quantize`). Types not asked for are left out of the
    answer, as Cohere leaves them."""

    # `float` is a builtin's name: the field is `float_`, sent as `float`.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)

    float_: Float32Rows | None = Field(None, alias="float")
    int8: Int8Rows | None = None
    uint8: UInt8Rows | None = None
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
