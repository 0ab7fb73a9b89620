"""Known traffic for the metrics tiers, and what it must do to the exported series.

`deploy_observed_app` deploys a gateway application of its own whose fleet is an
unreachable backend (weighted so it is tried first, then ejected for good) and the
session's recording proxy in front of the reference upstream; `send_known_traffic` sends
a fixed mix through it. The Serve tier compares the Ray metrics endpoint's counters before
and after (tests/integration/test_metrics_serve.py); the Prometheus tier asks a real
Prometheus for every dashboard panel's query (tests/prometheus/).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx
import openai
import orjson
import yaml

from tests.upstream_servers import ROOT, free_port

APP = "observed"
PREFIX = "/observed"
SERVED = "serve-app-demo"
EMBED_MODEL = "serve-app-demo-embed"
PROMPT = "Tell me about France"

# The dead backend takes (nearly) every first pick at equal load, fails to connect, is
# ejected by that one failure and stays out: one retry and one ejection, whatever the order.
DEAD_WEIGHT = 1e9
HEALTH = {"failure_threshold": 1, "cooldown_s": 3600, "max_cooldown_s": 3600,
          "probe_interval_s": 3600}


@dataclass(frozen=True)
class ObservedApp:
    url: str
    """The application's base url (no `/v1`)."""
    dead: str
    live: str
    """Backend urls: the `backend` label values."""


def deploy_observed_app(base_url: str, proxy_url: str) -> ObservedApp:
    """The gateway of serve_config.yaml under `PREFIX`, with a dead and a live backend."""
    from ray import serve
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    [app] = [a for a in config["applications"] if a["name"] == "gateway"]
    args = dict(app["args"])
    [backend] = args["upstream"]["backends"]
    dead, live = f"http://127.0.0.1:{free_port()}/v1", f"{proxy_url}/v1"
    args["upstream"] = {**args["upstream"], "health": HEALTH, "backends": [
        {**backend, "url": dead, "weight": DEAD_WEIGHT}, {**backend, "url": live}]}
    built = call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), args)
    serve.run(built, name=APP, route_prefix=PREFIX)
    return ObservedApp(f"{base_url}{PREFIX}", dead, live)


@dataclass
class Traffic:
    """What the known traffic was answered with: the counts the metrics must show."""

    prompt_tokens_text: int = 0
    prompt_tokens_client_embeds: int = 0
    completion_tokens: int = 0


def send_known_traffic(app: ObservedApp, embeds_b64: str) -> Traffic:
    """3 completions (one with client embeddings), 2 chats, 1 streamed completion,
    2 embeddings and 1 bad request (invalid JSON), one after another."""
    client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="EMPTY", max_retries=0)
    traffic = Traffic()
    for _ in range(2):
        usage = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4).usage
        assert usage is not None
        traffic.prompt_tokens_text += usage.prompt_tokens
        traffic.completion_tokens += usage.completion_tokens
    usage = client.completions.create(model=SERVED, prompt="", max_tokens=4,
                                      extra_body={"prompt_embeds": embeds_b64}).usage
    assert usage is not None
    traffic.prompt_tokens_client_embeds += usage.prompt_tokens
    traffic.completion_tokens += usage.completion_tokens
    for _ in range(2):
        chat = client.chat.completions.create(
            model=SERVED, max_tokens=4, messages=[{"role": "user", "content": PROMPT}])
        assert chat.usage is not None
        traffic.prompt_tokens_text += chat.usage.prompt_tokens
        traffic.completion_tokens += chat.usage.completion_tokens
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4,
                                            stream=True,
                                            stream_options={"include_usage": True}))
    [usage] = [chunk.usage for chunk in chunks if chunk.usage is not None]
    traffic.prompt_tokens_text += usage.prompt_tokens
    traffic.completion_tokens += usage.completion_tokens
    for _ in range(2):
        client.embeddings.create(model=EMBED_MODEL, input=[PROMPT])
    bad = httpx.post(f"{app.url}/v1/completions", content=b'{"prompt": ',
                     headers={"content-type": "application/json"}, timeout=30)
    assert bad.status_code == 400
    return traffic


def upstream_payload_bytes(bodies: list[bytes]) -> int:
    """Bytes of base64 embeddings in upstream request bodies: what the Embedder made."""
    total = 0
    for body in bodies:
        embeds = orjson.loads(body).get("prompt_embeds")
        total += sum(map(len, embeds)) if isinstance(embeds, list) else len(embeds)
    return total


# ----------------------------------------------------------------- the exposition format

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


@dataclass
class Scrape:
    """One scrape of a Prometheus text endpoint."""

    samples: list[Sample] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Scrape:
        samples = []
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match is None or line.startswith("#"):
                continue
            name, labels, value = match.groups()
            samples.append(Sample(name, dict(_LABEL.findall(labels or "")), float(value)))
        return cls(samples)

    @classmethod
    def get(cls, url: str) -> Scrape:
        response = httpx.get(url, timeout=10)
        response.raise_for_status()
        return cls.parse(response.text)

    def total(self, name: str, **labels: str) -> float:
        """The sum of every series of `name` whose labels include `labels`."""
        values = [s.value for s in self.samples
                  if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
        return math.fsum(values)

    def names(self) -> set[str]:
        return {sample.name for sample in self.samples}
