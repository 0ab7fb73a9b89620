"""The floor: the CPU per request of the work that no design of the gateway can avoid, on
the cores the gateway runs on, one request at a time:

- the prompt's rows: the lookup and its copy to the host (pinned, on a GPU; on a CPU the
  gather is the copy);
- one encode as the upstream wants the rows: `torch.save` + base64, spliced into the JSON
  body (the payload path of `serve_app.prompts.codec` and `serve_app.upstream.wire`);
- one write of that body to the sink over a loopback socket (and its small answer read).

Tokenizing, HTTP in front and every hop between processes are left out: they are the
costs a design chooses. CPU is the process's own (user + system, every thread), with one
torch thread, as a Ray replica of a fraction of a CPU gets; `end_to_end.py` runs it under
`taskset` on the serving cores.

    python benchmarks/floor.py --model DIR --sink http://127.0.0.1:PORT/v1 \
        --tokens 128 2048 8192 --seconds 3 --result-json floor.json
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama8b_sized import VOCAB  # noqa: E402

from serve_app.config import ModelConfig  # noqa: E402
from serve_app.prompts.codec import encode_prompt_embeds  # noqa: E402
from serve_app.prompts.embedder import EmbedderCore  # noqa: E402
from serve_app.upstream.wire import build_upstream_body  # noqa: E402

MODEL = "llama-3.1-8b-sized"


def token_ids(tokens: int, offset: int) -> list[int]:
    """The ids `llama8b_sized.prompt_of(tokens, offset)` tokenizes to."""
    return [(offset * 7919 + index * 31) % (VOCAB - 1) for index in range(tokens)]


class Sink:
    """One keep-alive HTTP/1.1 connection to the sink, written to and read from directly."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.path = f"{parsed.path}/completions"
        self.host = parsed.netloc
        self.sock = socket.create_connection((parsed.hostname, parsed.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pending = b""

    def post(self, body: list[bytes | memoryview]) -> bytes:
        length = sum(map(len, body))
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n")
        self.sock.sendall(head.encode())
        for buffer in body:
            self.sock.sendall(buffer)
        return self._answer()

    def _answer(self) -> bytes:
        while b"\r\n\r\n" not in self.pending:
            self._read()
        header, _, rest = self.pending.partition(b"\r\n\r\n")
        status = header.split(b" ", 2)[1]
        if status != b"200":
            raise RuntimeError(f"the sink answered {status.decode()}")
        length = next(int(line.split(b":", 1)[1]) for line in header.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        self.pending = rest
        while len(self.pending) < length:
            self._read()
        answer, self.pending = self.pending[:length], self.pending[length:]
        return answer

    def _read(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise RuntimeError("the sink closed the connection")
        self.pending += chunk


def one_request(core: EmbedderCore, sink: Sink, ids: list[int]) -> None:
    [rows] = core.lookup([ids])
    encoded = encode_prompt_embeds(rows)
    sink.post(build_upstream_body({"model": MODEL, "max_tokens": 1}, [encoded], "vllm"))


def measure(core: EmbedderCore, sink: Sink, tokens: int, seconds: float) -> dict[str, float]:
    """CPU ms and wall ms per request over at least `seconds` (and 5 requests)."""
    for offset in range(3):  # warm: allocator, pinned buffers, the archive layout
        one_request(core, sink, token_ids(tokens, offset))
    requests = 0
    cpu, wall = time.process_time(), time.perf_counter()
    while requests < 5 or time.perf_counter() - wall < seconds:
        one_request(core, sink, token_ids(tokens, requests))
        requests += 1
    return {"cpu_ms": (time.process_time() - cpu) / requests * 1e3,
            "wall_ms": (time.perf_counter() - wall) / requests * 1e3, "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--sink", required=True, help="the sink's base URL, up to /v1")
    parser.add_argument("--tokens", type=int, nargs="+", required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--result-json", type=Path, required=True)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    core = EmbedderCore.from_checkpoint(args.model, ModelConfig(source=str(args.model)))
    sink = Sink(args.sink)
    results = {str(tokens): measure(core, sink, tokens, args.seconds) for tokens in args.tokens}
    args.result_json.write_text(json.dumps({"device": str(core.weight.device),
                                            "tokens": results}))


if __name__ == "__main__":
    main()
