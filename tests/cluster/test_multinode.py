"""The GPU-cluster Serve config on a real multi-node Ray cluster (`ray.cluster_utils`).

A head that takes no replicas (no CPUs, no GPUs, the one Serve proxy), a CPU worker that
advertises `serve_app_cpu`, and a worker that declares two logical GPUs: the layout of
`cluster/rayservice.yaml`. The gateway is deployed from `cluster/serve_config.gpu.yaml`
through Serve's config path (`deploy_apps`, what `serve deploy` and KubeRay use), with
only what a laptop lacks swapped out: the demo model instead of the hub one, a reference
backend process as the upstream, small replica counts and short autoscaling delays.

Slow tier (about three minutes on two cores): `python -m pytest -m cluster tests/cluster`;
`.ci/check` runs it after the main session, in a process of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from serve_app import envs
from serve_app.allocator import PAYLOAD_ENV_VARS
from tests.upstream_servers import ROOT, ServerProcess, free_port

pytestmark = pytest.mark.cluster

APP = "gateway"
MODEL = "serve-app-demo"
# Logical capacity of the two workers. The replicas ask for what the cluster config says
# (1 CPU each, half a GPU for embedders); Ray only counts, so two real cores run it all.
CPU_WORKER = {"num_cpus": 8, "resources": {"serve_app_cpu": 8}}
GPU_WORKER = {"num_cpus": 4, "num_gpus": 2}


def local_cluster_config(reference_url: str, cache_dir: Path) -> dict[str, Any]:
    """`cluster/serve_config.gpu.yaml` with the laptop swaps; placement left as it is."""
    config: dict[str, Any] = yaml.safe_load(
        (ROOT / "cluster" / "serve_config.gpu.yaml").read_text())
    config["proxy_location"] = "HeadOnly"  # one proxy: every node here shares one address
    [app] = [a for a in config["applications"] if a["name"] == APP]
    app["runtime_env"] = {"env_vars": {**app.get("runtime_env", {}).get("env_vars", {}),
                                       envs.CACHE_DIR_ENV: str(cache_dir)}}
    args = app["args"]
    args["model"] = {"source": "demo", "device": "auto"}
    args["upstream"]["backends"] = [{"url": reference_url, "dialect": "vllm"}]
    args["upstream"]["health"] = {"probe_interval_s": 1}
    args["auth"] = {"api_keys_env": None}
    gpu_encoder = next(d for d in app["deployments"] if d["name"].startswith("Encoder_"))
    args["embedding_models"] = [{"source": "demo-encoder"}]
    gpu_encoder["name"] = "Encoder_serve-app-demo-embed"
    fast = {"upscale_delay_s": 1, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
            "look_back_period_s": 2}
    replicas = {"Gateway": (1, 2, 4), "Dispatcher": (1, 2, 4), "Embedder": (1, 3, 2),
                gpu_encoder["name"]: (1, 1, 8)}
    for deployment in app["deployments"]:
        low, high, target = replicas[deployment["name"]]
        deployment["autoscaling_config"] = {
            "min_replicas": low, "max_replicas": high, "target_ongoing_requests": target,
            **fast}
        deployment["health_check_period_s"] = 1
        deployment["health_check_timeout_s"] = 5
        deployment["graceful_shutdown_timeout_s"] = 20
        if deployment["name"] == "Embedder":
            # Requests wait for their batch to fill, so load shows as ongoing requests.
            deployment["user_config"] = {"max_batch_size": 64, "batch_wait_timeout_s": 0.2}
    return config


@dataclass
class LocalCluster:
    cluster: Any
    nodes: dict[str, Any]
    base_url: str
    reference: ServerProcess

    def node_of(self, node_id: str) -> str:
        for role, node in self.nodes.items():
            if node.node_id == node_id:
                return role
        raise LookupError(node_id)

    def replicas(self) -> dict[str, list[str]]:
        """Alive replicas of each gateway deployment, as the role of the node each is on."""
        import ray

        found: dict[str, list[str]] = {}
        for actor in ray._private.state.actors().values():  # GCS's table; no dashboard
            name = actor.get("Name") or ""
            if actor["State"] != "ALIVE" or not name.startswith(f"SERVE_REPLICA::{APP}#"):
                continue
            deployment = name.split("#")[1]
            found.setdefault(deployment, []).append(self.node_of(actor["Address"]["NodeID"]))
        return found

    def running(self) -> dict[str, int]:
        from ray import serve

        status = serve.status().applications[APP].deployments
        return {name: d.replica_states.get("RUNNING", 0) for name, d in status.items()}


@pytest.fixture(scope="module")
def local_cluster(cache_dir: Path, demo_model_dir: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    reference = ServerProcess("reference", "reference",
                              tmp_path_factory.mktemp("cluster") / "reference.jsonl")
    reference.start()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "num_gpus": 0, "include_dashboard": False,
        # Notice a dead node in about two seconds, not Ray's default of fifteen.
        "_system_config": {"health_check_period_ms": 500,
                           "health_check_failure_threshold": 4}})
    nodes = {"head": cluster.head_node, "cpu": cluster.add_node(**CPU_WORKER),
             "gpu": cluster.add_node(**GPU_WORKER)}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = ServeDeploySchema.model_validate(
            local_cluster_config(f"{reference.url}", cache_dir))
        _get_global_client().deploy_apps(config, _blocking=True)
        yield LocalCluster(cluster, nodes, f"http://127.0.0.1:{port}", reference)
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        reference.kill()


def sdk(local_cluster: LocalCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{local_cluster.base_url}/v1", api_key="EMPTY",
                         max_retries=0, timeout=60)


# ---------------------------------------------------------------------------- placement


def test_replicas_land_where_the_cluster_config_puts_them(local_cluster: LocalCluster) -> None:
    placed = local_cluster.replicas()
    assert set(placed) == {"Gateway", "Dispatcher", "Embedder", "Encoder_serve-app-demo-embed"}
    assert set(placed["Embedder"]) == {"gpu"}
    assert set(placed["Encoder_serve-app-demo-embed"]) == {"gpu"}
    assert set(placed["Gateway"]) == {"cpu"}
    assert set(placed["Dispatcher"]) == {"cpu"}


def test_requests_cross_the_nodes_end_to_end(local_cluster: LocalCluster) -> None:
    client = sdk(local_cluster)
    # Head (proxy) -> CPU node (Gateway) -> GPU node (Embedder) -> CPU node (Dispatcher)
    # -> the upstream, and back.
    completion = client.completions.create(model=MODEL, prompt="The capital of France is",
                                           max_tokens=4, temperature=0)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    vectors = client.embeddings.create(model="serve-app-demo-embed", input=["a", "b c"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0


# -------------------------------------------------------------------------- autoscaling


@dataclass
class Load:
    """Completions at a fixed concurrency until stopped; every outcome kept."""

    base_url: str
    concurrency: int
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=120)
        assert not self.thread.is_alive(), "the load generator hung"

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=60) as client:
            async def worker(index: int) -> None:
                while not self.stop.is_set():
                    started = time.monotonic()
                    try:
                        response = await client.post(f"{self.base_url}/v1/completions", json={
                            "model": MODEL, "prompt": f"request {index} goes", "max_tokens": 1})
                        outcome = "ok" if response.status_code == 200 else \
                            f"{response.status_code} {response.text[:120]}"
                    except httpx.TimeoutException:
                        outcome = "hung"
                    except httpx.HTTPError as error:
                        outcome = f"{type(error).__name__}"
                    self.outcomes.append((time.monotonic() - started, outcome))

            await asyncio.gather(*(worker(i) for i in range(self.concurrency)))

    def failures(self) -> list[str]:
        return [outcome for _, outcome in self.outcomes if outcome != "ok"]


def wait_until(predicate: Any, timeout_s: float, timeline: list[str], local: LocalCluster,
               started: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = local.running()
        timeline.append(f"{time.monotonic() - started:6.1f}s " + " ".join(
            f"{name.split('_')[0]}={count}" for name, count in sorted(counts.items())))
        if predicate(counts):
            return True
        time.sleep(1)
    return False


def test_replicas_scale_up_under_load_and_back_down_without_failures(
        local_cluster: LocalCluster) -> None:
    started = time.monotonic()
    timeline: list[str] = []
    assert wait_until(lambda c: all(n == 1 for n in c.values()), 60, timeline,
                      local_cluster, started), "not at min_replicas before the load"

    heavy = Load(local_cluster.base_url, concurrency=16).start()
    try:
        scaled = wait_until(
            lambda c: c["Embedder"] >= 2 and c["Gateway"] >= 2 and c["Dispatcher"] >= 2,
            120, timeline, local_cluster, started)
    finally:
        heavy.finish()
    # A trickle keeps requests arriving while replicas drain and stop.
    trickle = Load(local_cluster.base_url, concurrency=1).start()
    try:
        down = wait_until(lambda c: all(n == 1 for n in c.values()), 120, timeline,
                          local_cluster, started)
    finally:
        trickle.finish()
    print("\nreplicas over time (RUNNING per deployment):\n" + "\n".join(timeline))

    assert scaled, "Embedder, Gateway and Dispatcher did not all scale up under load"
    assert down, "replicas did not return to min_replicas after the load"
    placed = local_cluster.replicas()
    assert set(placed["Embedder"]) == {"gpu"} and set(placed["Gateway"]) == {"cpu"}
    total = len(heavy.outcomes) + len(trickle.outcomes)
    assert total > 50
    assert heavy.failures() == [] and trickle.failures() == [], \
        f"failed during scale events: {(heavy.failures() + trickle.failures())[:5]}"


# ------------------------------------------------------------------------- node failure


def test_losing_a_worker_node_under_load_is_survived(local_cluster: LocalCluster) -> None:
    # A second CPU worker joins (as KubeRay or the launcher would provide), then the one
    # that hosts the Gateway and Dispatcher replicas dies without warning.
    local_cluster.nodes["spare"] = local_cluster.cluster.add_node(**CPU_WORKER)
    assert set(local_cluster.replicas()["Gateway"]) == {"cpu"}
    load = Load(local_cluster.base_url, concurrency=8).start()
    started = time.monotonic()
    timeline: list[str] = []
    try:
        time.sleep(3)
        local_cluster.cluster.remove_node(local_cluster.nodes["cpu"], allow_graceful=False)
        recovered = wait_until(
            lambda c: c["Gateway"] >= 1 and c["Dispatcher"] >= 1
            and set(local_cluster.replicas().get("Gateway", [])) == {"spare"}
            and set(local_cluster.replicas().get("Dispatcher", [])) == {"spare"},
            120, timeline, local_cluster, started)
        time.sleep(3)
    finally:
        load.finish()
    print("\nreplicas after the node loss:\n" + "\n".join(timeline))
    assert recovered, "Gateway and Dispatcher were not rescheduled onto the spare node"

    failures = load.failures()
    assert "hung" not in failures
    assert all(seconds < 60 for seconds, _ in load.outcomes)
    clean = [f for f in failures if f[:1] in "45" or f in ("RemoteProtocolError", "ReadError")]
    assert clean == failures, f"unclean failures: {failures[:5]}"
    assert len(load.outcomes) - len(failures) > 0
    print(f"during the node loss: {len(load.outcomes)} requests, {len(failures)} clean errors")

    # Serving fully again: every request succeeds, across both remaining workers.
    client = sdk(local_cluster)
    for index in range(10):
        completion = client.completions.create(model=MODEL, prompt=f"after {index}",
                                               max_tokens=2)
        assert completion.choices[0].text is not None
    placed = local_cluster.replicas()
    assert set(placed["Embedder"]) == {"gpu"} and set(placed["Gateway"]) == {"spare"}


def test_config_swaps_keep_the_cluster_placement() -> None:
    """The test config differs from cluster/serve_config.gpu.yaml only where a laptop must."""
    original = yaml.safe_load((ROOT / "cluster" / "serve_config.gpu.yaml").read_text())
    local = local_cluster_config("http://127.0.0.1:1/v1", Path("/tmp"))
    [before] = [a for a in original["applications"] if a["name"] == APP]
    [after] = [a for a in local["applications"] if a["name"] == APP]
    options = {d["name"]: d["ray_actor_options"] for d in before["deployments"]}
    for deployment in after["deployments"]:
        name = deployment["name"]
        source = name if name in options else next(n for n in options if n.startswith("Encoder_"))
        assert deployment["ray_actor_options"] == options[source]
    assert after["runtime_env"]["env_vars"]["MALLOC_ARENA_MAX"] == \
        PAYLOAD_ENV_VARS["MALLOC_ARENA_MAX"]
