"""Tokens the upstream generates past a stop string the gateway applies itself.

With `privacy.forward_stop: false` the upstream never sees the stop strings: it generates
until the gateway, reading its stream, finds a stop and closes the request. What it
generates in between (the time for the stop's event to reach the gateway and for the
closed connection to reach the upstream) is wasted. With `privacy.stop_token_ids: true` a
stop string that is one token goes upstream as its id, and the upstream stops at that
token itself.

This runs the reference upstream in this process on a loopback port (uvicorn, as in
`serve_config.yaml`), each of its tokens taking at least `--token-ms` (a GPU server's time
per token; the demo model alone takes about a millisecond on a CPU), and the gateway's
completions service with its real HTTP client in front of it. For each prompt it takes
the greedy answer, picks a character the answer has not had before (one token of the demo
model) and the four-character string ending on it (several tokens), and asks again with
each as the stop. It reports the tokens the upstream generated beyond the ones the answer
counts (up to and including the token that completed the stop).

    python benchmarks/stop_overrun.py --token-ms 0 5 20 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import uvicorn

from serve_app import envs
from serve_app.api.completions import CompletionsService
from serve_app.api.pipeline import InProcessPipeline
from serve_app.api.served_model import ServedModel
from serve_app.config import AppConfig, BackendConfig, ModelConfig, PrivacyConfig, ReferenceConfig
from serve_app.demo.model import ensure_demo_model
from serve_app.prompts.embedder import EmbedderCore
from serve_app.reference import server as reference_server
from serve_app.reference.app import create_reference_app
from serve_app.upstream.dispatcher import DispatcherCore
from tests.upstream_servers import free_port

PROMPTS = ["Tell me about France.", "Tell me about Japan.", "What is the capital of Italy?",
           "Tell me about the sun.", "Germany is a country", "Paris has many",
           "A gateway keeps", "Tell me about Spain."]
MAX_TOKENS = 64
VARIANTS = {  # name: (privacy config, which stop)
    "one token, id sent": (PrivacyConfig(stop_token_ids=True), "char"),
    "one token, no id": (PrivacyConfig(), "char"),
    "four characters": (PrivacyConfig(), "ending"),
}


class Generated:
    """Wraps the reference's decode loop: counts each generation's tokens, and makes each
    take at least `token_s`."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.token_s = 0.0
        self.decode = reference_server.decode_steps

    def steps(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        self.counts.append(0)
        for step in self.decode(*args, **kwargs):
            if self.token_s:
                time.sleep(self.token_s)
            self.counts[-1] += 1
            yield step


def start_reference(port: int) -> uvicorn.Server:
    app = create_reference_app(reference_server.ReferenceServer.from_config(ReferenceConfig()))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def gateway(url: str, privacy: PrivacyConfig, embedder: EmbedderCore) -> CompletionsService:
    config = AppConfig(upstream={"backends": [BackendConfig(url=url)]}, privacy=privacy)
    return CompletionsService(ServedModel.from_config(
        config, InProcessPipeline(embedder, DispatcherCore.from_config(config.upstream))))


async def ask(service: CompletionsService, body: dict[str, Any]) -> dict[str, Any]:
    """The answer, joined from its events when streamed: texts, usage."""
    if not body.get("stream"):
        response = await service.create_completion(orjson.dumps(body))
        return orjson.loads(bytes(response.body))
    streamed = {**body, "stream_options": {"include_usage": True}}
    response = await service.create_completion(orjson.dumps(streamed))
    text, usage = "", None
    async for event in response.body_iterator:  # type: ignore[attr-defined]
        data = bytes(event).removeprefix(b"data: ").strip()
        if data != b"[DONE]":
            chunk = orjson.loads(data)
            text += "".join(choice["text"] for choice in chunk["choices"])
            usage = chunk.get("usage") or usage
    return {"choices": [{"text": text}], "usage": usage}


def stops_for(text: str) -> dict[str, str]:
    at = next(i for i in range(8, len(text)) if text[i].isascii() and text[i] not in text[:i])
    return {"char": text[at], "ending": text[at - 3 : at + 1]}


async def measure(args: argparse.Namespace) -> dict[tuple[float, str, bool], list[int]]:
    generated = Generated()
    reference_server.decode_steps = generated.steps  # type: ignore[assignment]
    port = free_port()
    server = start_reference(port)
    url = f"http://127.0.0.1:{port}/v1"
    embedder = EmbedderCore.from_checkpoint(ensure_demo_model(envs.cache_dir()), ModelConfig())
    services = {name: gateway(url, privacy, embedder) for name, (privacy, _) in VARIANTS.items()}
    base = {"model": "serve-app-demo", "temperature": 0, "max_tokens": MAX_TOKENS}
    plain = services["one token, no id"]
    stops = {p: stops_for((await ask(plain, {**base, "prompt": p}))["choices"][0]["text"])
             for p in PROMPTS}
    started, before = time.perf_counter(), sum(generated.counts)
    for prompt in PROMPTS:
        await ask(plain, {**base, "prompt": prompt})
    own_ms = (time.perf_counter() - started) * 1000 / (sum(generated.counts) - before)
    print(f"The demo model's own time per token here: {own_ms:.1f} ms (whole requests).\n")
    overruns: dict[tuple[float, str, bool], list[int]] = {}
    for token_ms in args.token_ms:
        generated.token_s = token_ms / 1000
        for _ in range(args.repeats):
            for prompt in PROMPTS:
                for name, (_, kind) in VARIANTS.items():
                    for stream in (False, True):
                        body = {**base, "prompt": prompt, "stop": [stops[prompt][kind]],
                                "stream": stream}
                        answer = await ask(services[name], body)
                        await asyncio.sleep(0.2)  # the cancelled generation winds down
                        counted = answer["usage"]["completion_tokens"]
                        overruns.setdefault((token_ms, name, stream), []).append(
                            generated.counts[-1] - counted)
    for service in services.values():
        await service.served.pipeline.dispatcher.aclose()  # type: ignore[attr-defined]
    server.should_exit = True
    return overruns


def report(overruns: dict[tuple[float, str, bool], list[int]]) -> None:
    print(f"Tokens generated past the stop ({platform.machine()}, {len(PROMPTS)} prompts, "
          "greedy, demo model), mean / max:\n")
    print("| time per token | stop | whole answers | streamed answers |")
    print("|---|---|---|---|")
    for token_ms in dict.fromkeys(key[0] for key in overruns):
        for name in VARIANTS:
            cells = [overruns[token_ms, name, stream] for stream in (False, True)]
            print(f"| +{token_ms:g} ms | {name} | " + " | ".join(
                f"{statistics.mean(values):.2f} / {max(values)}" for values in cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--token-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0])
    parser.add_argument("--repeats", type=int, default=3)
    report(asyncio.run(measure(parser.parse_args())))


if __name__ == "__main__":
    main()
