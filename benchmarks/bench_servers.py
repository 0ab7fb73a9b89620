"""The two servers the end-to-end benchmark runs beside the gateway, each its own process.

`sink`: a vLLM-compatible `/v1/completions` that decodes every payload exactly as vLLM
does (pybase64 `validate=True`, then `torch.load(weights_only=True)`), checks its shape,
and answers a one-token completion, so what is measured is the path to it. The sink
shares the machine's cores with what it measures, so it spends as little as it can around
the decode: the base64 text is cut out of the body where it stands (base64 holds no `"` or
`\\`) and only the rest of the body goes through a JSON parser; a 22 MB string through
`orjson.loads` alone would cost it 20 ms a request.

`baseline`: the seed pattern from NIM's and vLLM's prompt-embeds docs, written plainly: a
FastAPI process that loads the whole model with transformers, and per request tokenizes
the text, runs `get_input_embeddings()`, `torch.save`s, stdlib-base64-encodes,
`json.dumps` the body and posts it to the upstream with httpx.

    python benchmarks/bench_servers.py sink --port 9100 [--workers N]
    python benchmarks/bench_servers.py baseline --port 9101 --model DIR \
        --upstream http://127.0.0.1:9100/v1 [--workers N]

`--workers N` runs N uvicorn worker processes on the one port (default 1); each builds its
app from a factory here, the baseline's model and upstream passed in the environment.
"""

# No `from __future__ import annotations`: FastAPI reads the route's `Request` annotation,
# which is imported inside the factory, at definition time.
import argparse
import base64
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import uvicorn

_PAYLOAD_FIELD = re.compile(rb'"prompt_embeds"\s*:\s*"')


def split_payload(body: bytes) -> tuple[dict[str, Any], list[Any]]:
    """The request without its payloads, and the payloads: one memoryview of the body's
    base64 text when `prompt_embeds` is a plain string, else what a full parse gives."""
    import orjson

    field = _PAYLOAD_FIELD.search(body)
    if field is not None:
        start = field.end()
        end = body.find(b'"', start)
        if end > 0 and body.find(b"\\", start, end) < 0:
            rest = orjson.loads(body[:start - 1] + b"null" + body[end + 1:])
            return rest, [memoryview(body)[start:end]]
    parsed = orjson.loads(body)
    payloads = parsed.get("prompt_embeds")
    return parsed, payloads if isinstance(payloads, list) else [payloads]


def create_sink() -> Any:
    import pybase64
    import torch
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def completions(request: Request) -> Response:
        body, payloads = split_payload(await request.body())
        rows = 0
        for text in payloads:
            raw = pybase64.b64decode(text, validate=True)
            tensor = torch.load(io.BytesIO(raw), weights_only=True)
            if tensor.dim() != 2:
                return JSONResponse({"error": {"message": "bad shape"}}, 400)
            rows += int(tensor.shape[0])
        return JSONResponse({
            "id": "cmpl-sink", "object": "text_completion", "created": 0,
            "model": body.get("model"),
            "choices": [{"index": 0, "text": "x", "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": rows, "completion_tokens": 1, "total_tokens": rows + 1},
        })

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "sink", "object": "model"}]})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models)])


def create_baseline(model_dir: str, upstream: str) -> Any:
    import httpx
    import torch
    from fastapi import FastAPI, Request
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    client = httpx.AsyncClient(timeout=300)
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids).squeeze(0)
        buffer = io.BytesIO()
        torch.save(embeds, buffer)
        encoded = base64.b64encode(buffer.getvalue()).decode("utf-8")
        payload = {"model": body["model"], "prompt_embeds": encoded,
                   "max_tokens": body.get("max_tokens", 1)}
        response = await client.post(f"{upstream}/completions",
                                     content=json.dumps(payload).encode("utf-8"),
                                     headers={"content-type": "application/json"})
        return response.json()

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": "baseline", "object": "model"}]}

    return app


def create_baseline_from_env() -> Any:
    """The baseline for a uvicorn worker: `main` passes the model and upstream this way."""
    return create_baseline(os.environ["BENCH_BASELINE_MODEL"],
                           os.environ["BENCH_BASELINE_UPSTREAM"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["sink", "baseline"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model")
    parser.add_argument("--upstream")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    factory = "create_sink"
    if args.kind == "baseline":
        if args.model is None or args.upstream is None:
            parser.error("baseline needs --model and --upstream")
        os.environ["BENCH_BASELINE_MODEL"], os.environ["BENCH_BASELINE_UPSTREAM"] = (
            args.model, args.upstream)
        factory = "create_baseline_from_env"
    uvicorn.run(f"bench_servers:{factory}", factory=True, workers=args.workers,
                app_dir=str(Path(__file__).resolve().parent), host="127.0.0.1",
                port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
