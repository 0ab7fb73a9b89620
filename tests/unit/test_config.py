"""serve_config.yaml and the typed configs: validated exactly as `serve deploy` would, no Ray."""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError
from ray import serve
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeDeploySchema

from serve_app.config import (
    DEMO_SERVED_NAME,
    AppConfig,
    BackendConfig,
    ModelConfig,
    ReferenceConfig,
    UpstreamConfig,
)
from serve_app.deployments import (
    build_app,
    deployment_options,
    encoder_deployment_name,
    gateway_graph,
)

CONFIG_PATH = Path(__file__).resolve().parents[2] / "serve_config.yaml"


@pytest.fixture(scope="module")
def raw_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CONFIG_PATH.read_text())
    return config


def _builder(import_path: str) -> Any:
    module, attribute = import_path.split(":")
    return getattr(importlib.import_module(module), attribute)


def _app(raw_config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = [app for app in raw_config["applications"] if app["name"] == name]
    return app


def _deployment(app: dict[str, Any], name: str) -> dict[str, Any]:
    (deployment,) = [d for d in app["deployments"] if d["name"] == name]
    return deployment


def test_yaml_passes_serve_schema(raw_config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(raw_config)
    assert sorted(app.name for app in schema.applications) == ["gateway", "reference"]
    routes = {app.name: app.route_prefix for app in schema.applications}
    assert routes == {"gateway": "/", "reference": "/reference"}


def test_every_application_builds(raw_config: dict[str, Any]) -> None:
    for app in raw_config["applications"]:
        application = call_user_app_builder_with_args_if_necessary(
            _builder(app["import_path"]), app["args"]
        )
        assert isinstance(application, serve.Application)
        # Every deployment the yaml configures exists in the built graph (a misspelt name
        # would be rejected at deploy time), and the code defaults are fractional CPUs too.
        built = build_serve_app(application, name=app["name"])
        names = {deployment.name for deployment in built.deployments}
        assert {d["name"] for d in app.get("deployments", [])} <= names
        for deployment in built.deployments:
            assert 0 < deployment.ray_actor_options["num_cpus"] < 1, deployment.name


def test_gateway_graph_shape(raw_config: dict[str, Any]) -> None:
    app = _app(raw_config, "gateway")
    application = call_user_app_builder_with_args_if_necessary(
        _builder(app["import_path"]), app["args"]
    )
    built = build_serve_app(application, name="gateway")
    names = sorted(d.name for d in built.deployments)
    assert names == ["Dispatcher", "Embedder", "Encoder_serve-app-demo-embed", "Gateway"]
    assert built.ingress_deployment_name == "Gateway"
    # Every per-deployment override in the YAML names a deployment the graph has.
    assert {d["name"] for d in app.get("deployments", [])} <= set(names)


def test_every_yaml_deployment_uses_fractional_cpus(raw_config: dict[str, Any]) -> None:
    deployments = [d for app in raw_config["applications"] for d in app.get("deployments", [])]
    for deployment in deployments:
        num_cpus = deployment["ray_actor_options"]["num_cpus"]
        assert 0 < num_cpus < 1, deployment["name"]


DERIVED = {"user_config", "autoscaling_config", "max_ongoing_requests"}


def test_yaml_repeats_no_option_the_config_derives(raw_config: dict[str, Any]) -> None:
    """Batching, autoscaling and request caps come from `args`: the YAML holds no copy to
    keep equal (an entry there would override them)."""
    for deployment in _app(raw_config, "gateway").get("deployments", []):
        assert not DERIVED & set(deployment), deployment["name"]


def _built(config: AppConfig) -> dict[str, Any]:
    built = build_serve_app(build_app(config), name="gateway")
    return {deployment.name: deployment for deployment in built.deployments}


def test_options_follow_the_config() -> None:
    config = AppConfig.model_validate({
        "limits": {"max_concurrent_requests": 10, "max_receiving_requests": 5},
        "batching": {"max_batch_size": 32},
        "autoscaling": {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16},
        "upstream": {"backends": [{"url": "http://a/v1", "max_in_flight": 8},
                                  {"url": "http://b/v1", "max_in_flight": 4}]},
        "embedding_models": [{"served_name": "e.1", "autoscaling": {"max_replicas": 3}}],
        "model": {"adapters": [{"name": "tuned", "path": "/adapters/tuned"}]},
    })
    options = deployment_options(config)
    adapters = [{"name": "tuned", "path": "/adapters/tuned"}]
    assert options["Gateway"] == {"max_ongoing_requests": 15,
                                  "user_config": {"adapters": adapters}}
    assert options["Embedder"]["user_config"] == {"max_batch_size": 32,
                                                  "batch_wait_timeout_s": 0.0,
                                                  "adapters": adapters}
    assert options["Embedder"]["autoscaling_config"] == {
        "min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 16.0}
    assert options["Embedder"]["max_ongoing_requests"] > 16  # room beyond the target
    assert options["Dispatcher"]["user_config"] == config.upstream.model_dump(mode="json")
    assert options["Dispatcher"]["max_ongoing_requests"] >= 12  # every upstream slot
    encoder = options[encoder_deployment_name("e.1")]
    assert encoder["autoscaling_config"]["max_replicas"] == 3
    assert encoder["user_config"] == config.embedding_models[0].batching.model_dump()

    built = _built(config)
    assert set(built) == {"Gateway", "Embedder", "Dispatcher", "Encoder_e_1"}
    for name, deployment in built.items():
        wanted = options[encoder_deployment_name("e.1") if name == "Encoder_e_1" else name]
        assert deployment.max_ongoing_requests == wanted["max_ongoing_requests"], name
        if "user_config" in wanted:
            assert deployment.user_config == wanted["user_config"], name
    scaling = built["Embedder"]._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (2, 6)


def test_autoscaling_bounds_are_ordered() -> None:
    with pytest.raises(ValidationError, match="min_replicas"):
        AppConfig.model_validate({"autoscaling": {"min_replicas": 3, "max_replicas": 2}})


def test_duplicate_served_names_are_refused() -> None:
    with pytest.raises(ValidationError, match="unique"):
        AppConfig.model_validate({"embedding_models": [{}, {"source": "demo-encoder"}]})


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("upstream", "max_queue_wait_s"), -1, "max_queue_wait_s"),
        (("batching", "max_batch"), 8, "max_batch"),
        (("upstream", "backends"), [], "backends"),
        (("model", "dtype"), "int8", "dtype"),
        (("batching", "max_batch_size"), 0, "max_batch_size"),
        (("model", "source"), "  ", "source"),
    ],
)
def test_bad_gateway_args_name_the_field(
    raw_config: dict[str, Any], path: tuple[str, str], value: object, field: str
) -> None:
    app = _app(raw_config, "gateway")
    args = copy.deepcopy(app["args"])
    args.setdefault(path[0], {})[path[1]] = value
    with pytest.raises(ValidationError) as info:
        call_user_app_builder_with_args_if_necessary(_builder(app["import_path"]), args)
    assert field in str(info.value)
    assert any(error["loc"] == path for error in info.value.errors())


def test_bad_reference_args_name_the_field(raw_config: dict[str, Any]) -> None:
    app = _app(raw_config, "reference")
    args = {**copy.deepcopy(app["args"]), "max_tokens_defualt": 3}
    with pytest.raises(ValidationError, match="max_tokens_defualt"):
        call_user_app_builder_with_args_if_necessary(_builder(app["import_path"]), args)


def test_app_config_defaults() -> None:
    config = AppConfig()
    assert config.model.source == "demo"
    assert config.model.name == DEMO_SERVED_NAME == "serve-app-demo"
    [backend] = config.upstream.backends
    assert backend.dialect == "vllm"
    assert backend.url.startswith("http://")
    assert backend.probe_url == backend.url + "/models"
    assert ReferenceConfig().model.name == "serve-app-demo"


def test_model_name_resolution() -> None:
    assert ModelConfig(served_name="mine").name == "mine"
    assert ModelConfig(source="org/model/").name == "org/model"


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "ftp://host/v1", "ws://host/v1", ""])
def test_backend_url_needs_http_scheme(url: str) -> None:
    with pytest.raises(ValidationError, match="http"):
        BackendConfig(url=url)
    with pytest.raises(ValidationError, match="http"):
        BackendConfig(health_url=url)


def test_backend_url_trailing_slash_is_stripped() -> None:
    assert BackendConfig(url="https://nim.example/v1/").url == "https://nim.example/v1"


@pytest.mark.parametrize(
    ("backend", "field"),
    [({"dialect": "openai"}, "dialect"), ({"weight": 0}, "weight"),
     ({"max_in_flight": 0}, "max_in_flight"), ({"url": "http://a/v1", "wieght": 2}, "wieght")],
)
def test_bad_backend_names_the_field(backend: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as info:
        UpstreamConfig.model_validate({"backends": [backend]})
    assert field in str(info.value)


def test_probe_targets() -> None:
    assert BackendConfig(url="http://h:1/v1").probe_url == "http://h:1/v1/models"
    custom = BackendConfig(url="http://h:1/v1", health_url="http://h:1/health")
    assert custom.probe_url == "http://h:1/health"


def test_backend_urls_are_unique() -> None:
    with pytest.raises(ValidationError, match="unique: http://a/v1"):
        UpstreamConfig(backends=[BackendConfig(url="http://a/v1"),
                                 BackendConfig(url="http://a/v1/")])


def test_configs_are_frozen() -> None:
    config = AppConfig()
    with pytest.raises(ValidationError):
        config.model.source = "other"  # type: ignore[misc]


def test_build_app_is_a_serve_app_builder(raw_config: dict[str, Any]) -> None:
    """`serve run` calls the `import_path` builder with the `args` dict alone."""
    args = _app(raw_config, "gateway")["args"]
    built = build_serve_app(call_user_app_builder_with_args_if_necessary(build_app, args),
                            name="gateway")
    assert {d.name for d in built.deployments} >= {"Gateway", "Embedder", "Dispatcher"}


def test_gateway_graph_overrides_replace_autoscaling() -> None:
    config = AppConfig.model_validate({"upstream": {"backends": [{"url": "http://a/v1"}]}})
    built = build_serve_app(gateway_graph(config, {"Embedder": {"num_replicas": 3}}),
                            name="gateway")
    embedder = next(d for d in built.deployments if d.name == "Embedder")
    assert embedder.num_replicas == 3
    assert embedder._deployment_config.autoscaling_config is None
