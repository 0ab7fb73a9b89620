"""Real upstream servers on loopback ports, each in its own process, for the fleet tests.

`fake`: a small vLLM-compatible `/v1/completions` server that checks the embeddings
payload is there and decodes as base64, refuses what vLLM 0.26.0 refuses before it
generates (`vllm_refusal`) in vLLM's error shape, and can be made slow, failing, stalled or
killed (mid-stream too) through `POST /admin/mode`, and asked to log digests of the rows it
got.
Every request, finished answer and client disconnect is appended to a JSON-lines log,
which outlives a killed process.
`reference`: the project's reference upstream on the demo model.

    python -m tests.upstream_servers fake --port 9001 --name a --log a.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pybase64
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_MODE: dict[str, Any] = {
    "status": 200,            # answer every completion with this status
    "retry_after": None,      # Retry-After header on such an answer
    "delay_s": 0.0,           # wait before answering (a slow or busy backend)
    "events": 4,              # text events per streamed choice
    "gap_s": 0.0,             # wait between streamed events
    "exit_after_events": None,  # the process dies after this many events (mid-stream death)
    "stall_after_events": None,  # goes silent after this many events, connection open
    "health_status": 200,     # status of GET /v1/models and /health
    "row_digests": 0,         # log a digest of each of the first N rows of the first prompt
    "accept_text": False,     # answer a text `prompt` too, as vLLM's own text path would
                              # (benchmarks/vllm_upstream.py's direct clients, on a CPU)
}

MAX_PROMPTS = 1024
"""vLLM's `VLLM_MAX_COMPLETION_PROMPTS` default: the most prompts, or prompt embeddings, one
request may hold."""
MAX_LOGPROBS = 20
"""vLLM's `--max-logprobs` default."""


def vllm_error(message: str, status: int = 400, param: str | None = None) -> dict[str, Any]:
    """vLLM's error body: its `type` names the status, its `code` is the status itself."""
    kind = "".join(HTTPStatus(status).phrase.split())
    return {"error": {"message": message, "type": kind if kind.endswith("Error") else
                      f"{kind}Error", "param": param, "code": status}}


def vllm_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """The 400 vLLM 0.26.0 gives this completions body before generating, or None.

    Its request model's checks (entrypoints/openai/completion/protocol.py), in its order,
    then `logprobs` above `--max-logprobs`, which its engine checks: a streamed request
    meets that one as its stream's first event (`logprobs_refusal`), after the 200.
    """
    embeds = body.get("prompt_embeds", body.get("prompt-embeds"))
    prompt = body.get("prompt")
    if body.get("stream_options") and not body.get("stream"):
        return vllm_error("Stream options can only be defined when `stream=True`.",
                          param="stream_options")
    if prompt in (None, "") and embeds in (None, []):
        return vllm_error("Either prompt or prompt_embeds must be provided and non-empty.",
                          param="prompt")
    one_token_list = isinstance(prompt, list) and all(isinstance(i, int) for i in prompt)
    for name, items in (("prompt", None if one_token_list else prompt),
                        ("prompt_embeds", embeds)):
        if isinstance(items, list) and len(items) > MAX_PROMPTS:
            return vllm_error(f"{name} list length {len(items)} exceeds the maximum allowed "
                              f"count of {MAX_PROMPTS}. To increase this limit, set the "
                              "VLLM_MAX_COMPLETION_PROMPTS environment variable.", param=name)
    return logprobs_refusal(body)


def logprobs_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    logprobs = body.get("logprobs")
    if isinstance(logprobs, int) and logprobs > MAX_LOGPROBS:
        return vllm_error(f"Requested sample logprobs of {logprobs}, which is greater than "
                          f"max allowed: {MAX_LOGPROBS}", param="logprobs")
    return None


def create_fake_app(name: str, log: Path) -> Starlette:
    mode = dict(DEFAULT_MODE)

    def record(event: str, **fields: Any) -> None:
        with log.open("a") as out:
            out.write(json.dumps({"event": event, "server": name, "t": time.time(), **fields})
                      + "\n")

    async def set_mode(request: Request) -> Response:
        mode.clear()
        mode.update(DEFAULT_MODE, **(await request.json()))
        if mode["row_digests"]:
            import torch  # noqa: F401  here, not on the first request: importing blocks the loop
        return JSONResponse(mode)

    async def health(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model"}]},
                            status_code=mode["health_status"])

    async def completions(request: Request) -> Response:
        body = await request.json()
        embeds = body.get("prompt_embeds", body.get("prompt-embeds"))
        tag = body.get("cache_salt")  # the tests tag requests with an allowlisted field
        record("request", tag=tag, keys=sorted(body), model=body.get("model"),
               prompt=body.get("prompt"))
        refusal = vllm_refusal({**body, "logprobs": None} if body.get("stream") else body)
        if refusal is not None:
            return JSONResponse(refusal, 400)
        text = mode["accept_text"] and embeds is None and isinstance(body.get("prompt"), str)
        items = [] if text else embeds if isinstance(embeds, list) else [embeds]
        if not text and (embeds is None or not all(isinstance(item, str) and pybase64.b64decode(
                item, validate=True) for item in items)):
            return JSONResponse(vllm_error("prompt embeds missing or not base64",
                                           param="prompt_embeds"), 400)
        if mode["row_digests"] and items:
            record("rows", tag=tag, digests=row_digests(items[0], mode["row_digests"]))
        if mode["delay_s"]:
            await asyncio.sleep(mode["delay_s"])
        if mode["status"] != 200:
            headers = {"retry-after": str(mode["retry_after"])} if mode["retry_after"] else {}
            return JSONResponse(vllm_error(f"{name} refuses", mode["status"]), mode["status"],
                                headers=headers)
        answer = {"id": f"cmpl-{name}", "object": "text_completion", "created": 1,
                  "model": body.get("model")}
        usage = {"prompt_tokens": 0, "completion_tokens": mode["events"],
                 "total_tokens": mode["events"]}
        if not body.get("stream"):
            record("done", tag=tag)
            return JSONResponse({**answer, "usage": usage, "choices": [
                {"index": 0, "text": name, "logprobs": None, "finish_reason": "length"}]})
        return StreamingResponse(stream(answer, usage, tag, body), media_type="text/event-stream")

    async def stream(answer: dict[str, Any], usage: dict[str, Any], tag: Any,
                     body: dict[str, Any]) -> AsyncIterator[bytes]:
        finished = False
        try:
            # vLLM meets `logprobs` above its limit once its stream has begun.
            if (refusal := logprobs_refusal(body)) is not None:
                yield b"data: " + json.dumps(refusal).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
                finished = True
                record("done", tag=tag)
                return
            for index in range(mode["events"]):
                if index == mode["exit_after_events"]:
                    record("exit", tag=tag)
                    os._exit(1)
                if index == mode["stall_after_events"]:
                    await asyncio.sleep(3600)
                last = index == mode["events"] - 1
                choice = {"index": 0, "text": f"{name}{index} ", "logprobs": None,
                          "finish_reason": "length" if last else None}
                yield b"data: " + json.dumps({**answer, "choices": [choice]}).encode() + b"\n\n"
                if mode["gap_s"]:
                    await asyncio.sleep(mode["gap_s"])
            if (body.get("stream_options") or {}).get("include_usage"):
                yield b"data: " + json.dumps({**answer, "choices": [], "usage": usage}).encode()
                yield b"\n\n"
            yield b"data: [DONE]\n\n"
            finished = True
            record("done", tag=tag)
        finally:
            if not finished:
                record("disconnect", tag=tag)

    return Starlette(routes=[
        Route("/admin/mode", set_mode, methods=["POST"]),
        Route("/v1/models", health),
        Route("/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
    ])


def row_digests(encoded: str, count: int) -> list[str]:
    """sha256 of each of the first `count` rows' bytes, as a prefix cache would key them."""
    import io

    import torch  # only for the tests that ask: it slows the fake's start

    tensor = torch.load(io.BytesIO(pybase64.b64decode(encoded)), weights_only=True)
    raw = tensor[:count].contiguous().view(torch.uint8).numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in raw]


def create_reference() -> Any:
    from serve_app.config import ReferenceConfig
    from serve_app.reference.app import create_reference_app
    from serve_app.reference.server import ReferenceServer

    return create_reference_app(ReferenceServer.from_config(ReferenceConfig()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """One server process on a fixed loopback port, which survives kill and restart."""

    kind: str
    name: str
    log: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def launch(self) -> None:
        argv = [sys.executable, "-m", "tests.upstream_servers", self.kind,
                "--port", str(self.port), "--name", self.name, "--log", str(self.log)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "server exited"
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.kind} server {self.name} did not start")

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def reset(self) -> None:
        """Running again and in the default mode. A server a test told to exit closes its
        socket before the OS reports it gone, so a refused connection waits for the exit and
        restarts it rather than trusting `alive`."""
        if not self.alive:
            self.start()
        try:
            self.set_mode()
        except httpx.ConnectError:
            assert self.process is not None
            self.process.wait(timeout=10)
            self.start()
            self.set_mode()

    def set_mode(self, **mode: Any) -> None:
        httpx.post(f"http://127.0.0.1:{self.port}/admin/mode", json=mode,
                   timeout=5).raise_for_status()

    def events(self, event: str | None = None, tag_prefix: str = "") -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [row for row in rows if (event is None or row["event"] == event)
                and str(row.get("tag") or "").startswith(tag_prefix)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["fake", "reference"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="fake")
    parser.add_argument("--log", type=Path, default=Path(os.devnull))
    args = parser.parse_args()
    app = create_fake_app(args.name, args.log) if args.kind == "fake" else create_reference()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
