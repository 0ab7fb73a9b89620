"""serve_app.prompts.codec: the prompt-embeds wire format and the safe decode of client input."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import pybase64
import pytest
import torch

from serve_app.errors import GatewayError
from serve_app.prompts import untrusted
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.untrusted import EmbedsSpec, _has_internal_overlap, decode_prompt_embeds

HIDDEN = 8
MAX_ROWS = 16
SPEC = EmbedsSpec(
    hidden_size=HIDDEN, max_rows=MAX_ROWS, max_bytes=MAX_ROWS * HIDDEN * 4, dtype=torch.float32
)


def saved_b64(obj: object) -> str:
    """base64 (pybase64) of `torch.save(obj)`: what a client would put on the wire."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return pybase64.b64encode(buffer.getvalue()).decode("ascii")


def spec_for(dtype: torch.dtype) -> EmbedsSpec:
    return EmbedsSpec(HIDDEN, MAX_ROWS, MAX_ROWS * HIDDEN * 4, dtype)


def assert_rejected(text: str | bytes, word: str, spec: EmbedsSpec = SPEC) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        decode_prompt_embeds(text, spec)
    error = info.value
    assert error.status == 400
    assert error.param == "prompt_embeds"
    assert error.code == "invalid_prompt_embeds"
    assert word.lower() in error.message.lower(), error.message
    return error


# --- encode / decode round trips -------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    tensor = torch.randn(5, HIDDEN).to(dtype)
    encoded = encode_prompt_embeds(tensor)
    assert encoded.rows == 5
    assert isinstance(encoded.data, bytes)
    encoded.data.decode("ascii")  # the wire text is plain ASCII
    decoded = decode_prompt_embeds(encoded.data, spec_for(dtype))
    assert decoded.dtype == dtype
    assert decoded.is_contiguous()
    assert torch.equal(decoded, tensor)
    # str input decodes the same as bytes input
    assert torch.equal(decode_prompt_embeds(encoded.data.decode("ascii"), spec_for(dtype)), tensor)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float64, torch.float32),
    ],
)
def test_decode_casts_to_spec_dtype(source: torch.dtype, target: torch.dtype) -> None:
    tensor = torch.randn(3, HIDDEN, dtype=source)
    decoded = decode_prompt_embeds(encode_prompt_embeds(tensor).data, spec_for(target))
    assert decoded.dtype == target
    assert torch.equal(decoded, tensor.to(target))


def test_batch_of_one_is_squeezed() -> None:
    tensor = torch.randn(1, 4, HIDDEN)
    decoded = decode_prompt_embeds(saved_b64(tensor), SPEC)
    assert decoded.shape == (4, HIDDEN)
    assert torch.equal(decoded, tensor[0])


def test_parameter_is_accepted_as_plain_tensor() -> None:
    parameter = torch.nn.Parameter(torch.randn(2, HIDDEN))
    decoded = decode_prompt_embeds(saved_b64(parameter), SPEC)
    assert type(decoded) is torch.Tensor
    assert not decoded.requires_grad
    assert torch.equal(decoded, parameter.detach())


def test_encode_of_row_slice_writes_only_its_rows() -> None:
    big = torch.randn(1000, 64)
    piece = big[500:502]
    small = encode_prompt_embeds(piece)
    full = encode_prompt_embeds(big)
    assert small.rows == 2
    # 2 rows of 64 floats is 512 bytes of data; the full storage is 256 000 bytes.
    assert len(small.data) * 20 < len(full.data)
    decoded = decode_prompt_embeds(small.data, EmbedsSpec(64, 1000, 1000 * 64 * 4, torch.float32))
    assert torch.equal(decoded, piece)
    # The caller's tensor is untouched.
    assert piece.storage_offset() == 500 * 64


def test_encode_of_non_contiguous_view() -> None:
    tensor = torch.randn(HIDDEN, 3).t()
    assert not tensor.is_contiguous()
    assert torch.equal(decode_prompt_embeds(encode_prompt_embeds(tensor).data, SPEC), tensor)


@pytest.mark.parametrize("shape", [(HIDDEN,), (1, 2, HIDDEN)])
def test_encode_rejects_non_2d(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_prompt_embeds(torch.randn(*shape))


# --- text-level violations -------------------------------------------------------------


def test_over_long_text_is_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("base64 decoding ran before the length check")

    monkeypatch.setattr(untrusted.pybase64, "b64decode", no_decode)
    text = "A" * (SPEC.max_base64_chars + 1)
    error = assert_rejected(text, "limit")
    assert str(SPEC.max_base64_chars) in error.message


def test_text_at_the_length_limit_passes_the_length_check() -> None:
    # Exactly max_base64_chars of valid base64 of garbage: fails later, at load.
    text = "A" * (SPEC.max_base64_chars // 4 * 4)
    assert len(text) <= SPEC.max_base64_chars
    assert_rejected(text, "torch.save")


def test_empty_text() -> None:
    assert_rejected("", "empty")
    assert_rejected(b"", "empty")


@pytest.mark.parametrize("text", ["@@@@", "QUJD!", "QUJD RA==", "QUJDRA=", "QUJD\nRA=="])
def test_invalid_base64(text: str) -> None:
    assert_rejected(text, "base64")


def test_non_ascii_text() -> None:
    assert_rejected("QUJD\u00e9QUJD", "base64")
    assert_rejected(b"QUJDRA==" + "\u00e9".encode(), "base64")


def test_base64_of_garbage_bytes() -> None:
    garbage = pybase64.b64encode(os.urandom(512)).decode()
    assert_rejected(garbage, "torch.save")


def test_truncated_archive() -> None:
    buffer = io.BytesIO()
    torch.save(torch.randn(3, HIDDEN), buffer)
    raw = buffer.getvalue()
    assert_rejected(pybase64.b64encode(raw[: len(raw) // 2]), "torch.save")


def rewritten_archive(tensor: torch.Tensor, extra: dict[str, bytes] | None = None,
                      compression: int = zipfile.ZIP_STORED) -> str:
    """torch.save's archive of `tensor`, re-zipped with `extra` entries or compression."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w", compression) as out:
        for name in original.namelist():
            out.writestr(name, original.read(name))
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return pybase64.b64encode(forged.getvalue()).decode()


def test_plain_re_zip_is_still_accepted() -> None:
    tensor = torch.randn(3, HIDDEN)
    assert torch.equal(decode_prompt_embeds(rewritten_archive(tensor), SPEC), tensor)


@pytest.mark.parametrize(
    "extra",
    [{"archive/extra.py": b"print('hi')"}, {"other/data.pkl": b"x"},
     {"archive/data/1": b"\0" * 16}, {"archive/../../etc/passwd": b"x"}],
)
def test_archive_with_extra_entries(extra: dict[str, bytes]) -> None:
    assert_rejected(rewritten_archive(torch.randn(3, HIDDEN), extra), "archive")


def saved_bytes(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "change",
    [lambda raw: raw + b"garbage", lambda raw: raw + b"\0", lambda raw: b"PK" + raw,
     lambda raw: b"\0" * 64 + raw],
    ids=["trailing text", "trailing zero", "leading bytes", "leading zeros"],
)
def test_bytes_outside_the_archive_are_refused(change: Any) -> None:
    # zip readers skip them; a valid archive with a payload around it is not torch.save's.
    raw = saved_bytes(torch.randn(3, HIDDEN))
    assert_rejected(pybase64.b64encode(change(raw)), "bytes before, between or after")


def test_archive_comment_is_refused() -> None:
    forged = io.BytesIO()
    original = zipfile.ZipFile(io.BytesIO(saved_bytes(torch.randn(3, HIDDEN))))
    with zipfile.ZipFile(forged, "w") as out:
        for name in original.namelist():
            out.writestr(name, original.read(name))
        out.comment = b"hidden payload"
    assert_rejected(pybase64.b64encode(forged.getvalue()), "bytes before, between or after")


def test_meta_tensor_is_refused() -> None:
    # It loads as a shape without data: every later check would fail with an internal error.
    assert_rejected(saved_b64(torch.empty(3, HIDDEN, device="meta")), "meta")


def test_compressed_archive_is_refused() -> None:
    # A deflated record can declare far more bytes than the payload carries (a zip bomb).
    text = rewritten_archive(torch.zeros(3, HIDDEN), compression=zipfile.ZIP_DEFLATED)
    assert_rejected(text, "compressed")


def test_legacy_non_zip_format_is_refused() -> None:
    buffer = io.BytesIO()
    torch.save(torch.randn(3, HIDDEN), buffer, _use_new_zipfile_serialization=False)
    assert_rejected(pybase64.b64encode(buffer.getvalue()), "torch.save archive")


def test_archive_whose_storage_is_shorter_than_its_shape() -> None:
    """A forged zip claims a (3, 8) tensor over 8 bytes of storage: no out-of-bounds read."""
    buffer = io.BytesIO()
    torch.save(torch.randn(3, HIDDEN), buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as out:
        for name in original.namelist():
            data = original.read(name)
            out.writestr(name, data[:8] if name.endswith("data/0") else data)
    assert_rejected(pybase64.b64encode(forged.getvalue()), "torch.save")


# --- shape violations ------------------------------------------------------------------


def test_wrong_hidden_size() -> None:
    assert_rejected(saved_b64(torch.randn(3, HIDDEN + 1)), "hidden size")


def test_zero_rows() -> None:
    assert_rejected(saved_b64(torch.randn(0, HIDDEN)), "rows")


def test_too_many_rows() -> None:
    assert_rejected(saved_b64(torch.randn(MAX_ROWS + 1, HIDDEN)), "rows")
    # The limit itself is accepted.
    assert decode_prompt_embeds(saved_b64(torch.randn(MAX_ROWS, HIDDEN)), SPEC).shape[0] == MAX_ROWS


def test_too_many_bytes() -> None:
    spec = EmbedsSpec(HIDDEN, MAX_ROWS, max_bytes=2 * HIDDEN * 4, dtype=torch.float32)
    assert_rejected(saved_b64(torch.randn(3, HIDDEN)), "larger", spec)
    assert decode_prompt_embeds(saved_b64(torch.randn(2, HIDDEN)), spec).shape == (2, HIDDEN)


def test_batch_of_two() -> None:
    assert_rejected(saved_b64(torch.randn(2, 3, HIDDEN)), "shape")


def test_one_dimensional() -> None:
    assert_rejected(saved_b64(torch.randn(HIDDEN)), "shape")


def test_four_dimensional() -> None:
    assert_rejected(saved_b64(torch.randn(1, 1, 3, HIDDEN)), "shape")


# --- dtype / value violations ----------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.ones(3, HIDDEN, dtype=torch.int64),
        torch.ones(3, HIDDEN, dtype=torch.int8),
        torch.ones(3, HIDDEN, dtype=torch.bool),
        torch.randn(3, HIDDEN, dtype=torch.complex64),
    ],
    ids=["int64", "int8", "bool", "complex64"],
)
def test_non_floating_dtypes(tensor: torch.Tensor) -> None:
    assert_rejected(saved_b64(tensor), "floating-point")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(value: float) -> None:
    tensor = torch.randn(3, HIDDEN)
    tensor[1, 2] = value
    assert_rejected(saved_b64(tensor), "NaN or infinite")


def test_value_overflowing_the_target_dtype() -> None:
    tensor = torch.randn(3, HIDDEN)
    tensor[0, 0] = 1e6  # finite in float32, +inf in float16
    assert_rejected(saved_b64(tensor), "infinite", spec_for(torch.float16))
    # The same tensor is fine for a float32 model.
    assert decode_prompt_embeds(saved_b64(tensor), SPEC)[0, 0].item() == 1e6


# --- layout / stride violations --------------------------------------------------------


def test_sparse_coo() -> None:
    # Indices and values are two storages: refused from the archive's layout, unloaded.
    assert_rejected(saved_b64(torch.randn(3, HIDDEN).to_sparse()), "storage")


def test_sparse_csr() -> None:
    assert_rejected(saved_b64(torch.randn(3, HIDDEN).to_sparse_csr()), "storage")


def test_sparse_coo_with_out_of_range_index_fails_at_load() -> None:
    malicious = torch.sparse_coo_tensor(
        torch.tensor([[0, 99], [0, 1]]), torch.ones(2), (3, HIDDEN), check_invariants=False
    )
    assert_rejected(saved_b64(malicious), "storage")
    # Behind the archive check, the load itself runs with sparse invariant checks on
    # (never materialised into a layout check).
    with pytest.raises(GatewayError, match="torch.save"):
        untrusted._load_untrusted(pybase64.b64decode(saved_b64(malicious)), "prompt_embeds")
    # The process-wide invariant checking is switched back off afterwards.
    assert not torch.sparse.check_sparse_tensor_invariants.is_enabled()


def test_zero_stride_expanded_tensor() -> None:
    expanded = torch.randn(1, HIDDEN).expand(5, HIDDEN)
    text = saved_b64(expanded)
    # torch.save keeps the zero strides (one row of storage for five rows of tensor): what
    # a hostile client sends. Checked here so the refusal below cannot pass vacuously.
    loaded = torch.load(io.BytesIO(pybase64.b64decode(text)), weights_only=True)
    assert loaded.stride() == (0, 1) and loaded.untyped_storage().nbytes() == HIDDEN * 4
    assert_rejected(text, "overlapping")


def test_overlapping_non_zero_strides() -> None:
    overlapping = torch.randn(64).as_strided((4, HIDDEN), (2, 1))
    assert_rejected(saved_b64(overlapping), "overlapping")


@pytest.mark.parametrize(
    ("shape", "strides", "overlaps"),
    [
        ((3, 8), (8, 1), False),  # contiguous
        ((3, 8), (1, 3), False),  # transposed
        ((3, 8), (16, 1), False),  # gaps between rows
        ((1, 8), (0, 1), False),  # size-1 dimension's stride is irrelevant
        ((3, 1), (1, 0), False),
        ((5, 8), (0, 1), True),  # expanded rows
        ((3, 8), (8, 0), True),  # expanded columns
        ((4, 8), (2, 1), True),  # rows overlap
        ((2, 2), (1, 1), True),  # equal strides
        ((2, 3, 4), (12, 4, 1), False),
        ((2, 3, 4), (4, 4, 1), True),
    ],
)
def test_has_internal_overlap(
    shape: tuple[int, ...], strides: tuple[int, ...], overlaps: bool
) -> None:
    assert _has_internal_overlap(shape, strides) is overlaps


# --- not-a-tensor payloads -------------------------------------------------------------


def test_dict_instead_of_tensor() -> None:
    assert_rejected(saved_b64({"embeds": torch.randn(3, HIDDEN)}), "dict")


def test_list_of_tensors() -> None:
    assert_rejected(saved_b64([torch.randn(3, HIDDEN)]), "list")


def test_plain_number() -> None:
    assert_rejected(saved_b64(3), "tensor")


class MyTensor(torch.Tensor):
    pass


def test_tensor_subclass_is_refused_by_weights_only_load() -> None:
    subclass = torch.randn(3, HIDDEN).as_subclass(MyTensor)
    assert type(subclass) is MyTensor
    assert_rejected(saved_b64(subclass), "torch.save")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_code_running_pickle_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = saved_b64(_RunsCode(marker))
    assert_rejected(text, "torch.save")
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it.
    control = tmp_path / "control"
    torch.load(io.BytesIO(pybase64.b64decode(saved_b64(_RunsCode(control)))), weights_only=False)
    assert control.exists()


def test_param_name_appears_in_errors() -> None:
    with pytest.raises(GatewayError) as info:
        decode_prompt_embeds("", SPEC, param="messages[0].prompt_embeds")
    assert info.value.param == "messages[0].prompt_embeds"
    assert info.value.message.startswith("messages[0].prompt_embeds")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 8), (5, 3), (33, 64)])
def test_encode_is_torch_save_layout_loadable_as_vllm_loads_it(
    dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    """The buffers are the base64 of torch.save's own archive (every record at the same
    offset and size) with the data taken from the tensor; plain torch.load reads it."""
    tensor = torch.randn(*shape).to(dtype)
    encoded = encode_prompt_embeds(tensor)
    assert len(encoded.buffers) == 3 and all(len(p) % 4 == 0 for p in encoded.buffers[:2])
    raw = pybase64.b64decode(encoded.data, validate=True)
    reference = io.BytesIO()
    torch.save(tensor, reference)

    def layout(archive: bytes) -> list[tuple[str, int, int]]:
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            return [(i.filename, i.header_offset, i.file_size) for i in opened.infolist()]

    assert layout(raw) == layout(reference.getvalue())
    loaded = torch.load(io.BytesIO(raw), weights_only=True)
    assert loaded.dtype == dtype and torch.equal(loaded, tensor)


def test_encode_without_skip_data_falls_back_to_torch_save(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.serialization, "skip_data")
    tensor = torch.randn(4, 8)
    encoded = encode_prompt_embeds(tensor)
    assert len(encoded.buffers) == 1
    spec = EmbedsSpec(8, 16, 16 * 8 * 4, torch.float32)
    assert torch.equal(decode_prompt_embeds(encoded.data, spec), tensor)


def test_encoded_pickles_its_buffers_out_of_band() -> None:
    """Protocol 5 hands the buffers over out of band (what Ray stores once and maps in the
    receiver); older protocols and in-band pickling still round-trip."""
    import pickle

    tensor = torch.randn(6, HIDDEN)
    encoded = encode_prompt_embeds(tensor)
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(encoded, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 3 and len(stream) < 300
    received = pickle.loads(stream, buffers=buffers)
    assert all(isinstance(part, memoryview) for part in received.buffers)
    assert received.rows == 6 and received.data == encoded.data
    assert torch.equal(decode_prompt_embeds(received.data, SPEC), tensor)
    for protocol in (4, 5):
        copied = pickle.loads(pickle.dumps(encoded, protocol=protocol))
        assert copied.data == encoded.data and copied.nbytes == encoded.nbytes
