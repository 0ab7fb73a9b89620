"""Crafted prompt-embeds payloads through the whole gateway: each is a 400, nothing runs,
nothing goes upstream, and the gateway serves the next request as before."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import httpx
import pybase64
import pytest
import torch

from tests.unit.gateway_client import FRANCE, GREEDY, MODEL, RecordingASGITransport, error_of

HIDDEN = 64  # the demo model's


def b64_of_save(obj: object, **kwargs: object) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)  # type: ignore[arg-type]
    return pybase64.b64encode(buffer.getvalue()).decode()


def rezipped(tensor: torch.Tensor, edit: Callable[[str, bytes], bytes] = lambda n, d: d,
             extra: dict[str, bytes] | None = None) -> str:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    original = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    forged = io.BytesIO()
    with zipfile.ZipFile(forged, "w", zipfile.ZIP_STORED) as out:
        for name in original.namelist():
            out.writestr(name, edit(name, original.read(name)))
        for name, data in (extra or {}).items():
            out.writestr(name, data)
    return pybase64.b64encode(forged.getvalue()).decode()


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


class Subclass(torch.Tensor):
    pass


def truncated() -> str:
    raw = pybase64.b64decode(b64_of_save(torch.randn(4, HIDDEN)))
    return pybase64.b64encode(raw[: len(raw) // 2]).decode()


CORPUS: dict[str, Callable[[Path], str]] = {
    "sparse COO, out-of-range indices": lambda _: b64_of_save(torch.sparse_coo_tensor(
        torch.tensor([[0, 10_000], [0, 1]]), torch.ones(2), (4, HIDDEN),
        check_invariants=False)),
    "sparse CSR, out-of-range indices": lambda _: b64_of_save(torch.sparse_csr_tensor(
        torch.tensor([0, 1, 2]), torch.tensor([0, 10_000]), torch.ones(2), (2, HIDDEN),
        check_invariants=False)),
    # Well-formed: vLLM checks and densifies it; the gateway refuses every sparse tensor.
    "sparse COO, well-formed": lambda _: b64_of_save(torch.randn(4, HIDDEN).to_sparse()),
    "code-running pickle": lambda tmp: b64_of_save(RunsCode(tmp / "pwned")),
    "huge declared shape, tiny payload": lambda _: b64_of_save(
        torch.zeros(1, HIDDEN).expand(10_000_000, HIDDEN)),
    "declared shape beyond its storage": lambda _: rezipped(
        torch.randn(400, HIDDEN), lambda n, d: d[:8] if n.endswith("data/0") else d),
    "zero-stride rows": lambda _: b64_of_save(torch.randn(1, HIDDEN).expand(5, HIDDEN)),
    "NaN": lambda _: b64_of_save(torch.full((3, HIDDEN), float("nan"))),
    "Inf": lambda _: b64_of_save(torch.full((3, HIDDEN), float("inf"))),
    "int64": lambda _: b64_of_save(torch.ones(3, HIDDEN, dtype=torch.int64)),
    "bool": lambda _: b64_of_save(torch.ones(3, HIDDEN, dtype=torch.bool)),
    "complex": lambda _: b64_of_save(torch.ones(3, HIDDEN, dtype=torch.complex64)),
    "wrong hidden size": lambda _: b64_of_save(torch.randn(3, HIDDEN // 2)),
    "3-D with batch 2": lambda _: b64_of_save(torch.randn(2, 3, HIDDEN)),
    "0 rows": lambda _: b64_of_save(torch.randn(0, HIDDEN)),
    "truncated zip": lambda _: truncated(),
    "zip with extra entries": lambda _: rezipped(
        torch.randn(3, HIDDEN), extra={"archive/payload.py": b"import os"}),
    "valid base64 of garbage": lambda _: pybase64.b64encode(os.urandom(600)).decode(),
    "non-ASCII base64": lambda _: "QUJD" + "é" * 4,
    "tensor subclass": lambda _: b64_of_save(torch.randn(3, HIDDEN).as_subclass(Subclass)),
    "dict instead of a tensor": lambda _: b64_of_save({"embeds": torch.randn(3, HIDDEN)}),
    "list instead of a tensor": lambda _: b64_of_save([torch.randn(3, HIDDEN)]),
}


def where(route: str, payload: str) -> tuple[str, dict[str, object], str]:
    if route == "completions":
        return "/v1/completions", {"prompt_embeds": payload}, "prompt_embeds"
    if route == "nim spelling":
        return "/v1/completions", {"prompt": "", "prompt-embeds": [payload]}, "prompt_embeds.0"
    part = {"type": "prompt_embeds", "data": payload}
    return "/v1/chat/completions", {"messages": [{"role": "user", "content": [part]}]}, \
        "messages.0.content.0.data"


@pytest.mark.parametrize("route", ["completions", "nim spelling", "chat"])
@pytest.mark.parametrize("name", list(CORPUS))
async def test_hostile_payload_is_a_400_and_the_gateway_serves_on(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, tmp_path: Path,
    name: str, route: str,
) -> None:
    path, body, param = where(route, CORPUS[name](tmp_path))
    response = await gateway.post(path, json={"model": MODEL, **GREEDY, **body})
    error = error_of(response, 400)
    assert error["param"] == param  # the path of the tensor, wherever it is refused
    assert recorder.bodies == []  # nothing reached the upstream
    assert not (tmp_path / "pwned").exists()  # nothing ran
    after = await gateway.post("/v1/completions", json={"model": MODEL, "prompt": FRANCE,
                                                         **GREEDY})
    assert after.status_code == 200, after.text


def test_the_code_running_payload_is_live(tmp_path: Path) -> None:
    """The corpus's pickle does run code under an unsafe load, so its test means something."""
    raw = pybase64.b64decode(CORPUS["code-running pickle"](tmp_path))
    torch.load(io.BytesIO(raw), weights_only=False)
    assert (tmp_path / "pwned").exists()
