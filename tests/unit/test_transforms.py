"""Prompt transforms on the wire: what a recording upstream receives under each kind, the
keyed kind's prefix property, module loading, and a key that never leaves the process."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from serve_app.config import ModelConfig, TransformConfig
from serve_app.prompts.embedder import EmbedderCore, SplicedPrompt
from serve_app.prompts.keyed_noise import KeyedSeeds, standard_normals
from serve_app.prompts.transforms import (
    INVERTIBLE_WARNING,
    build_transform,
    describe,
    log_transform,
    matrix_std,
)
from tests.unit.gateway_client import (
    FRANCE,
    GREEDY,
    JAPAN,
    GatewayFactory,
    RecordingASGITransport,
    ok,
    post,
)

KEY_ENV = "SERVE_APP_TEST_TRANSFORM_KEY"
KEY = "k3y-6e1f0c2a9d-must-never-leak"
PREFIX = "The capital of France is Paris. "


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> TransformConfig:
    monkeypatch.setenv(KEY_ENV, KEY)
    return TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV)


def core_with(demo_model_dir: Path, transform: TransformConfig) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(), transform)


def sent_rows(recorder: RecordingASGITransport) -> list[torch.Tensor]:
    """The prompt embeddings of every request the upstream received, decoded."""
    rows = []
    for body in recorder.bodies:
        embeds = json.loads(body)["prompt_embeds"]
        for data in embeds if isinstance(embeds, list) else [embeds]:
            rows.append(torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True))
    return rows


def recovered(rows: torch.Tensor, weight: torch.Tensor, ids: list[int]) -> float:
    """Fraction of rows whose nearest matrix row is the true token: an upstream's view."""
    nearest = torch.cdist(rows.float(), weight.float()).argmin(dim=1)
    return float((nearest == torch.tensor(ids)).float().mean())


def token_ids(demo_tokenizer: Any, text: str) -> list[int]:
    return list(demo_tokenizer(text).input_ids)


async def test_none_sends_the_raw_rows(
    gateway: httpx.AsyncClient, recorder: RecordingASGITransport, embedder: EmbedderCore,
    demo_tokenizer: Any,
) -> None:
    await ok(gateway, prompt=FRANCE, **GREEDY)
    [rows] = sent_rows(recorder)
    ids = token_ids(demo_tokenizer, FRANCE)
    assert torch.equal(rows, embedder.lookup([ids])[0])
    assert recovered(rows, embedder.weight, ids) == 1.0


async def test_gaussian_sends_fresh_noise_every_request(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, demo_model_dir: Path,
    demo_tokenizer: Any,
) -> None:
    core = core_with(demo_model_dir, TransformConfig(kind="gaussian", sigma=3.0))
    gateway = make_gateway(recorder, core=core)
    torch.manual_seed(0)  # the noise is fresh, but the recovery asserted below is one draw's
    await ok(gateway, prompt=FRANCE, **GREEDY)
    await ok(gateway, prompt=FRANCE, **GREEDY)
    first, second = sent_rows(recorder)
    ids = token_ids(demo_tokenizer, FRANCE)
    raw = core.lookup([ids])[0]
    assert not torch.equal(first, second)
    noise = (first - raw) / core.weight.float().std()
    assert 2.7 < float(noise.std()) < 3.3  # sigma 3 in the matrix's std, over 31 x 64 draws
    assert recovered(first, core.weight, ids) < 0.9


async def test_keyed_rows_are_shared_for_a_shared_prefix_only(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, demo_model_dir: Path,
    demo_tokenizer: Any, keyed: TransformConfig,
) -> None:
    core = core_with(demo_model_dir, keyed)
    gateway = make_gateway(recorder, core=core)
    for suffix in ("Its river is the Seine.", "Rome is in Italy.", "Its river is the Seine."):
        await ok(gateway, prompt=PREFIX + suffix, **GREEDY)
    seine, rome, seine_again = sent_rows(recorder)
    shared = len(token_ids(demo_tokenizer, PREFIX + "R")) - 1  # the prefix's rows, BOS included
    assert seine[:shared].numpy().tobytes() == rome[:shared].numpy().tobytes()
    end = min(len(seine), len(rome))
    differing = seine[shared:end] != rome[shared:end]
    assert differing.any(dim=1).all()  # every row after the first difference changes
    assert torch.equal(seine, seine_again)  # repeating cannot average the noise away
    raw = core.lookup([token_ids(demo_tokenizer, PREFIX + "Rome is in Italy.")])[0]
    assert not torch.equal(rome, raw)


def test_keyed_rows_depend_on_the_key(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      keyed: TransformConfig) -> None:
    ids = [[0, 40, 41, 42, 43]]
    first = core_with(demo_model_dir, keyed).rows(ids)[0]
    monkeypatch.setenv(KEY_ENV, KEY[::-1])
    other = core_with(demo_model_dir, keyed).rows(ids)[0]
    assert (first != other).any(dim=1).all()


def test_keyed_rows_are_identical_in_another_process(demo_model_dir: Path,
                                                      keyed: TransformConfig) -> None:
    """Replicas on the same kind of device send byte-identical rows (the prefix cache)."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from serve_app.config import ModelConfig, TransformConfig\n"
        "from serve_app.prompts.embedder import EmbedderCore\n"
        f"config = TransformConfig(kind='keyed_gaussian', key_env={KEY_ENV!r})\n"
        "core = EmbedderCore.from_checkpoint(Path(sys.argv[1]), ModelConfig(), config)\n"
        "sys.stdout.buffer.write(core.rows([[0, 40, 41, 42, 43]])[0].numpy().tobytes())\n"
    )
    other = subprocess.run([sys.executable, "-c", script, str(demo_model_dir)],
                           capture_output=True, check=True, env=dict(os.environ)).stdout
    here = core_with(demo_model_dir, keyed).rows([[0, 40, 41, 42, 43]])[0]
    assert other == here.numpy().tobytes()


def test_keyed_noise_is_standard_normal_and_a_function_of_the_seed() -> None:
    low = torch.tensor([1, -1, 7, 1], dtype=torch.int32)
    high = torch.tensor([0, 0, 5, 0], dtype=torch.int32)
    noise = standard_normals(low, high, 4097)
    assert noise.shape == (4, 4097)
    assert torch.equal(noise[0], noise[3]) and not torch.equal(noise[0], noise[1])
    assert abs(float(noise.mean())) < 0.03 and abs(float(noise.std()) - 1) < 0.03
    # The high half matters as much as the low one.
    assert not torch.equal(noise[0], standard_normals(low[:1], high[:1] + 1, 4097)[0])


def seeds_of(seeds: KeyedSeeds, *prompts: list[int]) -> list[list[tuple[int, int]]]:
    low, high = seeds.seeds(torch.tensor([c for p in prompts for c in p]),
                            [len(p) for p in prompts])
    pairs = list(zip(low.tolist(), high.tolist(), strict=True))
    out, start = [], 0
    for prompt in prompts:
        out.append(pairs[start:start + len(prompt)])
        start += len(prompt)
    return out


def test_keyed_seeds_follow_the_prefix_within_each_prompt() -> None:
    seeds = KeyedSeeds(KEY)
    a, b, a_again = seeds_of(seeds, [5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8])
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]
    assert a == a_again  # a prompt's seeds do not depend on the prompts before it
    [alone] = seeds_of(seeds, [5, 6, 7, 8])
    assert alone == a
    [swapped] = seeds_of(seeds, [6, 5, 7, 8])
    assert all(x != y for x, y in zip(swapped, a, strict=True))  # order matters
    [client] = seeds_of(seeds, [-(2**55) - 3, 6])
    assert client != seeds_of(seeds, [-(2**55) - 4, 6])[0]  # client digests, high bits too
    assert seeds_of(KeyedSeeds(KEY + "x"), [5])[0] != a[:1]
    assert KEY not in repr(seeds) and KEY not in repr(seeds.__dict__)
    with pytest.raises(ValueError, match="at least 16") as short:
        KeyedSeeds("short-key")
    assert "short-key" not in str(short.value)


def test_a_missing_key_is_named_by_its_variable(demo_model_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = TransformConfig(kind="keyed_gaussian", key_env=KEY_ENV)
    with pytest.raises(ValueError, match=KEY_ENV):
        core_with(demo_model_dir, config)
    with pytest.raises(ValidationError, match="key_env"):
        TransformConfig(kind="keyed_gaussian")


async def test_the_key_appears_nowhere_a_client_or_operator_looks(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, demo_model_dir: Path,
    keyed: TransformConfig, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    log_transform(keyed)
    core = core_with(demo_model_dir, keyed)
    gateway = make_gateway(recorder, core=core, privacy={"transform": keyed})
    seen = [(await gateway.get("/health")).text,
            (await post(gateway, prompt=FRANCE, **GREEDY)).text,
            (await post(gateway, prompt=FRANCE, max_tokens=-1)).text,
            (await post(gateway, prompt_embeds="bad*base64")).text,
            repr(core.transform), repr(core.__dict__)]
    seen += [record.getMessage() for record in caplog.records]
    seen += [body.decode() for body in recorder.bodies]
    assert all(KEY not in text and KEY_ENV not in text for text in seen[:3])
    assert not [text for text in seen if KEY in text]
    health = (await gateway.get("/health")).json()
    assert health["privacy"]["transform"] == {"kind": "keyed_gaussian", "sigma": 1.0,
                                              "apply_to_client_embeds": False}


def test_the_start_up_log_warns_when_rows_go_untransformed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    log_transform(TransformConfig())
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, INVERTIBLE_WARNING)]
    caplog.clear()
    log_transform(TransformConfig(kind="gaussian", sigma=2.0))
    [record] = caplog.records
    assert record.levelno == logging.INFO and "'sigma': 2.0" in record.getMessage()


class Shift(torch.nn.Module):
    """A test transform: rows * scale + shift, plus each row's token id when given."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(hidden))
        self.shift = torch.nn.Parameter(torch.zeros(hidden))

    def forward(self, rows: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        out = rows * self.scale + self.shift
        return out if ids is None else out + ids[:, None].to(rows.dtype)


class Widen(torch.nn.Module):
    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows], dim=1)


def module_config(tmp_path: Path, **overrides: Any) -> TransformConfig:
    weights = tmp_path / "shift.safetensors"
    save_file({"scale": torch.full((64,), 2.0), "shift": torch.full((64,), 0.5)}, weights)
    fields = {"kind": "module", "module": f"{__name__}:Shift", "module_weights": str(weights)}
    return TransformConfig(**(fields | overrides))


async def test_module_rows_reach_the_upstream(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, demo_model_dir: Path,
    demo_tokenizer: Any, tmp_path: Path,
) -> None:
    core = core_with(demo_model_dir, module_config(tmp_path))
    await ok(make_gateway(recorder, core=core), prompt=JAPAN, **GREEDY)
    [rows] = sent_rows(recorder)
    ids = token_ids(demo_tokenizer, JAPAN)
    assert torch.allclose(rows, core.lookup([ids])[0] * 2.0 + 0.5)
    with_ids = core_with(demo_model_dir, module_config(tmp_path, module_token_ids=True))
    [rows] = with_ids.rows([ids])
    assert torch.allclose(rows, core.lookup([ids])[0] * 2.0 + 0.5 + torch.tensor(ids)[:, None])


def test_module_weights_must_be_safetensors(tmp_path: Path, demo_model_dir: Path) -> None:
    with pytest.raises(ValidationError, match="safetensors"):
        TransformConfig(kind="module", module=f"{__name__}:Shift", module_weights="w.pt")
    marker = tmp_path / "pickle-ran"
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps(_Payload(str(marker))))
    config = TransformConfig(kind="module", module=f"{__name__}:Shift",
                             module_weights=str(disguised))
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        core_with(demo_model_dir, config)
    assert not marker.exists()


class _Payload:
    """A pickle that, if ever unpickled, leaves a file behind."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def test_a_module_that_changes_the_shape_is_refused_at_start(demo_model_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="shape, dtype and device"):
        core_with(demo_model_dir, TransformConfig(kind="module", module=f"{__name__}:Widen"))
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        core_with(demo_model_dir, TransformConfig(kind="module", module="json:dumps"))


@pytest.mark.parametrize("to_client", [False, True])
def test_client_rows_are_transformed_only_when_configured(
    demo_model_dir: Path, keyed: TransformConfig, to_client: bool,
) -> None:
    core = core_with(demo_model_dir, keyed.model_copy(
        update={"apply_to_client_embeds": to_client}))
    client = torch.randn(3, 64)
    [spliced, alone] = core.rows([SplicedPrompt(([0, 40, 41], client, [42, 43])),
                                  SplicedPrompt((client,))])
    raw = core.lookup([[0, 40, 41, 42, 43]])[0]
    assert (spliced[:3] != raw[:3]).any(dim=1).all()  # text rows: always transformed
    assert (spliced[6:] != raw[3:]).any(dim=1).all()
    assert torch.equal(spliced[3:6], client) is not to_client
    assert torch.equal(alone, client) is not to_client


def test_describe_names_parameters_and_never_the_key_or_its_variable(tmp_path: Path) -> None:
    keyed = TransformConfig(kind="keyed_gaussian", sigma=0.5, key_env=KEY_ENV)
    assert describe(keyed) == {"kind": "keyed_gaussian", "sigma": 0.5,
                               "apply_to_client_embeds": False}
    assert describe(module_config(tmp_path)) == {
        "kind": "module", "module": f"{__name__}:Shift", "token_ids": False,
        "weights": "shift.safetensors", "apply_to_client_embeds": False}


def test_none_builds_no_transform() -> None:
    assert build_transform(TransformConfig(), torch.ones(4, 2)) is None


@pytest.mark.parametrize("rows_per_chunk", [1, 7, 8192])
def test_matrix_std_is_torch_std_read_in_chunks(rows_per_chunk: int) -> None:
    weight = (torch.randn(300, 64) * 0.02 + 0.001).to(torch.bfloat16)
    assert matrix_std(weight, rows_per_chunk) == pytest.approx(
        float(weight.float().std()), rel=1e-5)


def test_no_transform_reads_no_matrix_statistics() -> None:
    """`none` must not touch the matrix (a float copy of a large one costs GiBs): a matrix
    with no data behind it still gives no transform."""
    assert build_transform(TransformConfig(kind="none"), torch.empty(8, 4, device="meta")) is None
