"""Prompt transforms on the wire: what a recording upstream receives under each kind, the
noise's generator (float64 from 53-bit uniforms, rounded once), the keyed kind's prefix
property and what its seeds bind, module loading, and a key that never leaves the process."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import pickle
import random
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
from serve_app.prompts import transforms
from serve_app.prompts.embedder import EmbedderCore, SplicedPrompt
from serve_app.prompts.keyed_noise import KeyedSeeds, SeedBinding
from serve_app.prompts.normals import add_noise, standard_normals
from serve_app.prompts.tenants import SHARED_TENANT
from serve_app.prompts.transforms import (
    INVERTIBLE_WARNING,
    GaussianNoise,
    KeyedGaussianNoise,
    NoiseSpec,
    build_keyed_transform,
    build_transform,
    describe,
    log_transform,
    matrix_digest,
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
    assert isinstance(core.transform, GaussianNoise)
    # The noise is fresh, but the recovery asserted below is one draw's: seeded here.
    core.transform.entropy = random.Random(0).randbytes
    gateway = make_gateway(recorder, core=core)
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


BINDING = SeedBinding(sigma=1.0, dtype=torch.float32, model="test-model")


def test_the_noise_is_a_pure_function_of_the_seed_and_standard_normal() -> None:
    seeds = torch.tensor([1, -1, 7, 1, 2**62 + 5], dtype=torch.int64)
    noise = standard_normals(seeds, 4097)
    assert noise.shape == (5, 4097) and noise.dtype == torch.float64
    assert torch.equal(noise[0], noise[3]) and not torch.equal(noise[0], noise[1])
    many = standard_normals(torch.arange(64, dtype=torch.int64) * 7919, 4096)
    assert abs(float(many.mean())) < 0.01 and abs(float(many.std()) - 1) < 0.01
    # Every one of the 64 bits matters: seeds one bit apart share no value.
    for bit in (0, 31, 32, 63):
        flipped = standard_normals(seeds[:1] ^ (1 << bit if bit < 63 else -(1 << 63)), 4097)
        assert (flipped != noise[:1]).all()


def _reference_normals(seed: int, hidden: int) -> list[float]:
    """The stream as `normals` documents it, in Python integers and `math`: SplitMix64
    from the seed, top 53 bits per uniform, adjacent Box-Muller pairs."""
    mask = (1 << 64) - 1

    def uniform_bits(k: int) -> int:
        z = (seed + (k + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return (z ^ (z >> 31)) >> 11

    out = []
    for p in range((hidden + 1) // 2):
        radius = math.sqrt(-2.0 * math.log((uniform_bits(2 * p) + 1) / 2.0**53))
        angle = 2.0 * math.pi * uniform_bits(2 * p + 1) / 2.0**53
        out += [radius * math.cos(angle), radius * math.sin(angle)]
    return out[:hidden]


@pytest.mark.parametrize("seed", [0, 12345, -(2**63), 2**63 - 1])
def test_the_noise_is_53_bit_uniforms_in_float64_paired_adjacently(seed: int) -> None:
    """What `NoiseSpec` tells the audit, checked against an independent implementation: a
    24-bit or float32 stream would miss by far more than float64's last bits."""
    noise = standard_normals(torch.tensor([seed], dtype=torch.int64), 257)[0]
    expected = torch.tensor(_reference_normals(seed % 2**64, 257), dtype=torch.float64)
    torch.testing.assert_close(noise, expected, rtol=1e-13, atol=1e-13)
    # Values no float32 holds: the noise is finer than the wire's dtype.
    assert float((noise.float().double() != noise).float().mean()) > 0.99
    spec = NoiseSpec(0.5, torch.float64, 53, "adjacent_columns")
    keyed = KeyedGaussianNoise(0.5, KeyedSeeds("k" * 16, SeedBinding(1.0, torch.float32, "m")))
    assert GaussianNoise(0.5).noise_spec == keyed.noise_spec == spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [64, 65, 3000])
def test_noisy_rows_are_float64_rounded_once_to_the_wire_dtype(
    dtype: torch.dtype, hidden: int,
) -> None:
    rows = (torch.randn(300, hidden, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
    seeds = torch.arange(300, dtype=torch.int64) * 104729 - 2**40
    noise = standard_normals(seeds, hidden)
    noised = add_noise(rows, seeds, 0.013)
    assert noised.dtype == dtype
    assert torch.equal(noised, (rows.double() + 0.013 * noise).to(dtype))
    if dtype == torch.float32:  # added in float32, it rounds twice, and differently
        assert not torch.equal(noised, rows + 0.013 * noise.float())


def test_a_rows_noise_does_not_depend_on_the_rows_batched_with_it() -> None:
    seeds = torch.randint(-(2**63), 2**63 - 1, (2000,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(3))
    whole = standard_normals(seeds, 1000)
    pieces = torch.cat([standard_normals(seeds[i:i + 37], 1000) for i in range(0, 2000, 37)])
    assert torch.equal(whole, pieces)
    rows = torch.zeros(2000, 1000, dtype=torch.bfloat16)
    assert torch.equal(add_noise(rows, seeds, 0.5)[1234], add_noise(rows[:1], seeds[1234:1235],
                                                                      0.5)[0])


@pytest.mark.parametrize("threads", [1, 3])
def test_the_embedders_rows_are_the_same_on_any_number_of_threads(
    demo_model_dir: Path, keyed: TransformConfig, threads: int,
) -> None:
    """A batch spans many chunks, which run on torch's threads (in inference mode, as the
    Embedder calls them): the bytes do not depend on how many."""
    core = core_with(demo_model_dir, keyed)
    batch = [[0, *range(i, i + 250)] for i in range(8)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows = core.rows(batch)
        torch.set_num_threads(1)
        alone = [core.rows([prompt])[0] for prompt in batch]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(rows, alone, strict=True))
    seeds = torch.arange(2000, dtype=torch.int64)
    assert torch.equal(standard_normals(seeds, 64)[1999], standard_normals(seeds[1999:], 64)[0])


def test_gaussian_seeds_are_fresh_and_not_torchs() -> None:
    """Fresh seeds come from the operating system: reseeding torch (whose CPU generator
    keeps only 32 bits of a seed) repeats nothing."""
    noise = GaussianNoise(0.5)
    rows = torch.zeros(4, 64)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(noise(rows, torch.arange(4), [4], [SHARED_TENANT]))
    assert (draws[0] != draws[1]).all()
    seeded = [GaussianNoise(0.5, random.Random(7).randbytes)(rows, torch.arange(4), [4],
                                                               [SHARED_TENANT])
              for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])  # the audit's reproducible draws


def seeds_of(seeds: KeyedSeeds, *prompts: list[int],
             tenants: list[str] | None = None) -> list[list[int]]:
    values = seeds.seeds(torch.tensor([c for p in prompts for c in p]),
                         [len(p) for p in prompts],
                         tenants or [SHARED_TENANT] * len(prompts)).tolist()
    out, start = [], 0
    for prompt in prompts:
        out.append(values[start:start + len(prompt)])
        start += len(prompt)
    return out


def test_keyed_seeds_follow_the_prefix_within_each_prompt() -> None:
    seeds = KeyedSeeds(KEY, BINDING)
    a, b, a_again = seeds_of(seeds, [5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8])
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]
    assert a == a_again  # a prompt's seeds do not depend on the prompts before it
    [alone] = seeds_of(seeds, [5, 6, 7, 8])
    assert alone == a
    [swapped] = seeds_of(seeds, [6, 5, 7, 8])
    assert all(x != y for x, y in zip(swapped, a, strict=True))  # order matters
    [client] = seeds_of(seeds, [-(2**55) - 3, 6])
    assert client != seeds_of(seeds, [-(2**55) - 4, 6])[0]  # client digests, high bits too
    assert seeds_of(KeyedSeeds(KEY + "x", BINDING), [5])[0] != a[:1]
    assert KEY not in repr(seeds) and KEY not in repr(seeds.__dict__)
    with pytest.raises(ValueError, match="at least 16") as short:
        KeyedSeeds("short-key", BINDING)
    assert "short-key" not in str(short.value)


@pytest.mark.parametrize("change", [
    {"sigma": 1.5}, {"dtype": torch.bfloat16}, {"model": "another-model"},
    {"kind": "keyed_gaussian_other"}, {"version": 3},
])
def test_each_bound_parameter_changes_every_seed(change: dict[str, Any]) -> None:
    prompts = [[0, 5, 6, 7, 8], [0, 9]]
    base = seeds_of(KeyedSeeds(KEY, BINDING), *prompts)
    changed = seeds_of(KeyedSeeds(KEY, SeedBinding(**{**vars(BINDING), **change})), *prompts)
    assert all(x != y for p, q in zip(base, changed, strict=True)
               for x, y in zip(p, q, strict=True))
    assert seeds_of(KeyedSeeds(KEY, SeedBinding(**vars(BINDING))), *prompts) == base


def test_two_tenants_share_no_seed() -> None:
    seeds = KeyedSeeds(KEY, BINDING)
    prompt = [0, 5, 6, 7, 8, 9]
    ours, theirs, ours_again = seeds_of(seeds, prompt, prompt, prompt,
                                        tenants=["key:a", "key:b", "key:a"])
    assert ours == ours_again
    assert all(x != y for x, y in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match="one tenant per prompt"):
        seeds.seeds(torch.tensor(prompt), [6], [])


def test_two_sigmas_under_one_key_reveal_no_more_than_one_sighting(
    demo_model_dir: Path, keyed: TransformConfig,
) -> None:
    """Noise reused under two sigmas would cancel: y1 = x + s1 n and y2 = x + s2 n give
    x = (s2 y1 - s1 y2) / (s2 - s1). Sigma is bound into the seeds, so n1 and n2 are
    independent and the solved rows are noisier than either sighting."""
    ids = list(range(1, 256))
    first = core_with(demo_model_dir, keyed.model_copy(update={"sigma": 3.0}))
    second = core_with(demo_model_dir, keyed.model_copy(update={"sigma": 4.0}))
    assert isinstance(first.transform, KeyedGaussianNoise)
    assert isinstance(second.transform, KeyedGaussianNoise)
    s1, s2 = first.transform.scale, second.transform.scale
    [y1], [y2] = first.rows([ids]), second.rows([ids])
    solved = (s2 * y1.double() - s1 * y2.double()) / (s2 - s1)
    weight = first.weight
    one_sighting = recovered(y1, weight, ids)
    assert one_sighting < 0.9
    assert recovered(solved, weight, ids) <= one_sighting


@pytest.mark.parametrize("change", ["sigma", "dtype", "model"])
def test_each_parameter_change_changes_every_row(
    demo_model_dir: Path, keyed: TransformConfig, change: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """So rows made under one parameter set never meet rows of another (and the upstream's
    prefix cache refills)."""
    weight = core_with(demo_model_dir, TransformConfig()).weight
    if change == "dtype":  # the model's digest names the dtype too: here the binding alone
        monkeypatch.setattr(transforms, "matrix_digest", lambda *_: "one-model")
    ids = [[0, 40, 41, 42, 43, 44, 45]]
    base = EmbedderCore(weight, build_keyed_transform(keyed, weight, KEY)).rows(ids)[0]
    config, other = keyed, weight.clone()
    if change == "sigma":
        config = keyed.model_copy(update={"sigma": 1.01})
    elif change == "dtype":
        other = weight.to(torch.bfloat16)
    else:
        other[200, 7] += 1e-3  # one value of a row no prompt here uses
    changed = EmbedderCore(other, build_keyed_transform(config, other, KEY)).rows(ids)[0]
    # The noise itself is new, not only its size or rounding: the same noise at another
    # scale keeps its signs, fresh noise flips about half of them in every row.
    noise = base.double() - weight[ids[0]].double()
    other_noise = changed.double() - other[ids[0]].double()
    flipped = (torch.sign(noise) != torch.sign(other_noise)).double().mean(dim=1)
    assert (flipped > 0.25).all(), flipped
    same = EmbedderCore(weight.clone(), build_keyed_transform(keyed, weight.clone(), KEY))
    assert torch.equal(same.rows(ids)[0], base)


def test_the_model_digest_is_of_the_weights_bytes() -> None:
    weight = torch.randn(50, 8)
    digest = matrix_digest(weight)
    assert digest == matrix_digest(weight.clone()) == matrix_digest(weight, rows_per_chunk=7)
    changed = weight.clone()
    changed[49, 7] = torch.nextafter(changed[49, 7], torch.tensor(1e9))
    assert matrix_digest(changed) != digest
    assert matrix_digest(weight.to(torch.bfloat16)) != digest
    assert matrix_digest(weight.reshape(8, 50)) != digest


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
    assert (await gateway.get("/health")).json() == {"status": "ok"}
    privacy = (await gateway.get("/health/privacy")).json()
    assert privacy == {"transform": {"kind": "keyed_gaussian", "sigma": 1.0,
                                     "apply_to_client_embeds": False}, "tenant": "shared"}


async def test_health_is_open_and_silent_and_the_privacy_details_need_the_key(
    make_gateway: GatewayFactory, recorder: RecordingASGITransport, demo_model_dir: Path,
    keyed: TransformConfig,
) -> None:
    """Sigma is half of what the exact-arithmetic attack needs: only a client with a key
    reads it."""
    core = core_with(demo_model_dir, keyed)
    gateway = make_gateway(recorder, core=core, api_keys=("sk-health-a1",),
                           privacy={"transform": keyed})
    health = await gateway.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    denied = await gateway.get("/health/privacy")
    assert denied.status_code == 401 and "sigma" not in denied.text
    privacy = await gateway.get("/health/privacy", headers={"authorization": "Bearer sk-health-a1"})
    assert privacy.json() == {"transform": {"kind": "keyed_gaussian", "sigma": 1.0,
                                            "apply_to_client_embeds": False},
                              "tenant": "api_key"}
    assert KEY not in privacy.text and KEY_ENV not in privacy.text


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
