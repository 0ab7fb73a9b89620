"""The prompt-embeds wire format: base64 of `torch.save` of a `(rows, hidden)` tensor, as
vLLM reads it, encoded from our own tensors without a copy of their data.

Client tensors are decoded only by `untrusted.decode_prompt_embeds`.
"""

from __future__ import annotations

import functools
import io
import pickle
from dataclasses import dataclass
from typing import IO, Any, SupportsIndex, cast

import pybase64
import torch

Buffer = bytes | memoryview


@dataclass(frozen=True)
class EncodedPromptEmbeds:
    """One prompt's embeddings on the wire: base64 text (ASCII bytes) in buffers that are
    sent back to back, never joined, and its row count.

    Pickled with protocol 5 the buffers travel as out-of-band buffers, so Ray puts them in
    the object store once and the receiving replica reads them in place (as read-only
    memoryviews) instead of copying them into and out of a pickle stream.
    """

    buffers: tuple[Buffer, ...]
    rows: int

    @property
    def data(self) -> bytes:
        """The whole base64 text (a copy, unless there is one `bytes` piece)."""
        return b"".join(self.buffers)

    @property
    def nbytes(self) -> int:
        return sum(len(part) for part in self.buffers)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        if int(protocol) >= 5:
            return _rebuild_encoded, (tuple(pickle.PickleBuffer(p) for p in self.buffers),
                                      self.rows)
        return _rebuild_encoded, (tuple(bytes(p) for p in self.buffers), self.rows)


def _rebuild_encoded(parts: tuple[Any, ...], rows: int) -> EncodedPromptEmbeds:
    buffers = tuple(p if isinstance(p, bytes) else memoryview(p).cast("B") for p in parts)
    return EncodedPromptEmbeds(buffers, rows)


def base64_length(nbytes: int) -> int:
    """Length of the (padded) base64 text of `nbytes` bytes."""
    return 4 * -(-nbytes // 3)


def encode_prompt_embeds(tensor: torch.Tensor) -> EncodedPromptEmbeds:
    """base64 of `torch.save(tensor)` for a 2-D tensor, saving only its own elements.

    The archive around the data is torch.save's own layout for that shape, made under
    `skip_data` (about 1.5 KiB, cached per shape); the data is base64-encoded straight
    from the tensor's memory, so a row slice of a batch needs no copy. The three buffers are
    cut at multiples of 3 bytes, so together they are exactly the base64 of the archive.
    As with torch.save's `compute_crc32=False`, the data record's CRC is 0: torch.load
    does not check CRCs.
    """
    if tensor.dim() != 2:
        raise ValueError(f"expected a 2-D (rows, hidden) tensor, got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().to("cpu").contiguous()
    rows = int(tensor.shape[0])
    if not hasattr(torch.serialization, "skip_data"):  # torch < 2.6: torch.save itself
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # torch.save writes a view's whole storage
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return EncodedPromptEmbeds((pybase64.b64encode(buffer.getbuffer()),), rows)
    head, tail = _archive_around_data(tensor.dtype, rows, int(tensor.shape[1]))
    data = tensor.view(torch.uint8).numpy().data.cast("B")
    lead = -len(head) % 3  # data bytes that complete the head's last 3-byte group
    body_end = lead + (len(data) - lead) // 3 * 3
    parts = (
        pybase64.b64encode(head + data[:lead]),
        pybase64.b64encode(data[lead:body_end]),
        pybase64.b64encode(bytes(data[body_end:]) + tail),
    )
    return EncodedPromptEmbeds(parts, rows)


class _ArchiveRecorder:
    """A seekable sink for torch.save that keeps every write with its offset."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.position = 0
        self.end = 0

    def write(self, chunk: bytes) -> int:
        self.writes.append((self.position, bytes(chunk)))
        self.position += len(chunk)
        self.end = max(self.end, self.position)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.end}[whence]
        self.position = base + offset
        self.end = max(self.end, self.position)
        return self.position

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass


@functools.lru_cache(maxsize=4096)
def _archive_around_data(dtype: torch.dtype, rows: int, hidden: int) -> tuple[bytes, bytes]:
    """torch.save's archive of a contiguous `(rows, hidden)` tensor without the data: the
    bytes before and after it (about 1.5 KiB, the same for every tensor of that shape)."""
    tensor = torch.empty(rows, hidden, dtype=dtype)
    recorder = _ArchiveRecorder()
    with torch.serialization.skip_data():
        torch.save(tensor, cast(IO[bytes], recorder))
    size = tensor.numel() * tensor.element_size()
    covered = sorted((offset, offset + len(chunk)) for offset, chunk in recorder.writes)
    reach = 0
    start = -1
    for begin, stop in covered:  # the data is the one gap of `size` bytes
        if begin - reach == size:
            start = reach
            break
        reach = max(reach, stop)
    if start < 0:
        raise RuntimeError("torch.save wrote an archive layout this encoder does not know")
    head, tail = bytearray(start), bytearray(recorder.end - start - size)
    for offset, chunk in recorder.writes:  # later writes win, as in a file
        if offset < start:
            head[offset:offset + len(chunk)] = chunk
        else:
            tail[offset - start - size:offset - start - size + len(chunk)] = chunk
    return bytes(head), bytes(tail)
