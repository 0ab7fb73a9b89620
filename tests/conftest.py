"""Fixtures shared by every tier: the demo checkpoint, built once per test session, and the
fake vLLM upstreams (real processes on loopback ports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serve_app import envs
from serve_app.demo.model import ensure_demo_model
from tests.upstream_servers import ServerProcess


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-private SERVE_APP_CACHE_DIR, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("serve-app-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(envs.CACHE_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def demo_model_dir(cache_dir: Path) -> Path:
    return ensure_demo_model(cache_dir)


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="session")
def demo_causal_lm(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model_dir).eval()


@pytest.fixture(scope="session")
def demo_encoder_dir(cache_dir: Path) -> Path:
    from serve_app.demo.encoder import ensure_demo_encoder

    return ensure_demo_encoder(cache_dir)


@pytest.fixture(scope="session")
def sentence_transformer(demo_encoder_dir: Path):  # type: ignore[no-untyped-def]
    """The reference the gateway's vectors are compared with, on the same checkpoint."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(demo_encoder_dir), device="cpu")


# --------------------------------------------------------------------- fake upstreams


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    logs = tmp_path_factory.mktemp("fleet-logs")
    fleet = {name: ServerProcess("fake", name, logs / f"{name}.jsonl") for name in "abc"}
    for server in fleet.values():
        server.launch()
    for server in fleet.values():
        server.wait_ready()
    yield fleet
    for server in fleet.values():
        server.kill()


@pytest.fixture
def fakes(servers: dict[str, ServerProcess]) -> dict[str, ServerProcess]:
    """Fake vLLM servers a, b and c, each alive (restarted if a test killed it) and back in
    its default mode."""
    for server in servers.values():
        server.reset()
    return servers


# --------------------------------------------------------------------- prompt adapters


@pytest.fixture(scope="session")
def prompt_tuning_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PROMPT_TUNING adapter of the demo model, trained and saved by PEFT."""
    from tests.peft_adapters import train_adapter

    return train_adapter(demo_model_dir, tmp_path_factory.mktemp("prompt-tuning"),
                         "PROMPT_TUNING")


@pytest.fixture(scope="session")
def p_tuning_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A P_TUNING adapter (an MLP prompt encoder) of the demo model, trained and saved by
    PEFT."""
    from tests.peft_adapters import train_adapter

    return train_adapter(demo_model_dir, tmp_path_factory.mktemp("p-tuning"), "P_TUNING",
                         virtual_tokens=6)
