"""The inversion audit on the demo model: the figures it reports for `none` and for the
gaussian levels docs/privacy.md quotes, the keyed transform's checks, and the command line
(`python -m serve_app.privacy audit`, `serve-app-audit`) printing those same figures."""

from __future__ import annotations

import ast
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve_app import envs
from serve_app.config import AppConfig, ModelConfig, TransformConfig
from serve_app.privacy import __main__ as cli
from serve_app.privacy.audit import AuditModel, AuditResult, CleanRun, measure, prepare
from serve_app.privacy.config_file import read_app_config
from serve_app.privacy.configured import (
    TransformKey,
    audited_transform,
    keyed_checks,
    sweep_configs,
)
from serve_app.privacy.sample import BUILT_IN_SAMPLE, read_sample
from serve_app.prompts.embedder import EmbedderCore
from serve_app.prompts.transforms import build_transform

REPO = Path(__file__).resolve().parents[2]
SWEEP = (1.0, 2.0, 3.0, 4.0)
KEY_ENV = "SERVE_APP_AUDIT_TEST_KEY"
# The built-in sample's rows on the demo model (10 texts, BOS included): every figure
# below is a count of these. A change to the sample or the demo model changes them.
ROWS = 574

# `serve-app-audit --sweep 1,2,3,4` on the demo model, seed 0, 8 greedy prompts (the figures
# docs/privacy.md shows), as counts of ROWS where they are fractions of rows.
PINNED = {
    2.0: {"l2": 522 / ROWS, "cosine": 521 / ROWS, "top5": 542 / ROWS,
          "next_token_agreement": 208 / ROWS, "mean_kl": 2.8931, "greedy_match": 1 / 8},
    3.0: {"l2": 450 / ROWS, "cosine": 425 / ROWS, "top5": 489 / ROWS,
          "next_token_agreement": 157 / ROWS, "mean_kl": 3.6074, "greedy_match": 1 / 8},
}
# Tolerances. The noise is seeded and identical on 1 and 2 threads here; what may move on
# another CPU or torch build is float rounding in the distance and attention kernels.
# - recovery: 3 rows of 574, for near-ties between two rows of the matrix that rounding
#   may break the other way;
RECOVERY_ABS = 3 / ROWS
# - next-token agreement: 6 positions of 574: under this much noise the top two logits of
#   some positions are close, and rounding may swap them;
AGREEMENT_ABS = 6 / ROWS
# - mean KL: 1% relative, far above rounding (about 1e-6 relative) and far below the gap
#   between neighbouring sigmas (15% or more);
KL_REL = 0.01
# - greedy match: one prompt of 8, whose 16 tokens may differ in one near-tied step.
GREEDY_ABS = 1 / 8


@pytest.fixture(scope="module")
def audit_model(demo_model_dir: Path) -> AuditModel:
    return AuditModel.load(ModelConfig(), "cpu")


@pytest.fixture(scope="module")
def clean(audit_model: AuditModel) -> CleanRun:
    return prepare(audit_model, BUILT_IN_SAMPLE, greedy_prompts=8)


@pytest.fixture(scope="module")
def none_result(audit_model: AuditModel, clean: CleanRun) -> AuditResult:
    return measure(audit_model, clean, TransformConfig(), seed=0)


@pytest.fixture(scope="module")
def sweep(audit_model: AuditModel, clean: CleanRun) -> dict[float, AuditResult]:
    configs = sweep_configs(TransformConfig(), SWEEP)
    return {config.sigma: measure(audit_model, clean, config, seed=0) for config in configs}


def _subprocess_env(cache_dir: Path) -> dict[str, str]:
    """The test session's demo model for a child process, and no key in its environment."""
    env = {**os.environ, envs.CACHE_DIR_ENV: str(cache_dir)}
    env.pop(KEY_ENV, None)
    return env


# ------------------------------------------------------------------ the measurements


def test_none_leaves_every_token_recoverable_and_every_answer_unchanged(
        none_result: AuditResult) -> None:
    recovery, use = none_result.token_recovery, none_result.utility
    assert min(recovery.l2, recovery.cosine, recovery.top5) >= 0.99
    assert use.next_token_agreement == 1.0
    assert use.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert use.greedy_match == 1.0
    assert none_result.samples.rows == ROWS
    assert none_result.transform == {"kind": "none", "apply_to_client_embeds": False}


@pytest.mark.parametrize("sigma", sorted(PINNED))
def test_gaussian_lowers_recovery_and_agreement_to_the_pinned_figures(
        sweep: dict[float, AuditResult], sigma: float) -> None:
    result, pinned = sweep[sigma], PINNED[sigma]
    assert result.transform == {"kind": "gaussian", "sigma": sigma,
                                "apply_to_client_embeds": False}
    for name in ("l2", "cosine", "top5"):
        assert getattr(result.token_recovery, name) == pytest.approx(
            pinned[name], abs=RECOVERY_ABS), name
    assert result.utility.next_token_agreement == pytest.approx(
        pinned["next_token_agreement"], abs=AGREEMENT_ABS)
    assert result.utility.mean_kl == pytest.approx(pinned["mean_kl"], rel=KL_REL)
    assert result.utility.greedy_match == pytest.approx(pinned["greedy_match"], abs=GREEDY_ABS)


def test_more_noise_leaves_fewer_tokens_and_worse_answers(
        none_result: AuditResult, sweep: dict[float, AuditResult]) -> None:
    results = [none_result, *(sweep[sigma] for sigma in SWEEP)]
    for lower, higher in itertools.pairwise(results):
        assert higher.token_recovery.l2 <= lower.token_recovery.l2
        assert higher.utility.next_token_agreement < lower.utility.next_token_agreement
        assert higher.utility.mean_kl > lower.utility.mean_kl
    recovered = [sweep[sigma].token_recovery.l2 for sigma in (2.0, 3.0, 4.0)]
    assert recovered == sorted(recovered, reverse=True) and len(set(recovered)) == 3


def test_keyed_transform_is_the_gateways_and_keeps_its_promises(
        audit_model: AuditModel, clean: CleanRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "an audit test key of 32 chars..")
    config = TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV)
    key = TransformKey.for_config(config)
    assert not key.ephemeral and KEY_ENV not in repr(key) and key.value not in repr(key)
    gateway = EmbedderCore(audit_model.weight, build_transform(config, audit_model.weight))
    audited = EmbedderCore(audit_model.weight, audited_transform(config, audit_model.weight,
                                                                 key))
    for sent, measured in zip(gateway.rows(clean.prompts), audited.rows(clean.prompts),
                              strict=True):
        assert torch.equal(sent, measured)

    result = measure(audit_model, clean, config, seed=0)
    assert result.keyed is not None
    assert result.keyed.key == "environment"
    assert result.keyed.identical_prefixes_identical_rows
    assert result.keyed.different_keys_different_rows
    assert set(result.as_json()) == {"transform", "token_recovery", "attacks", "utility",
                                     "samples", "keyed"}


def test_keyed_checks_use_an_ephemeral_key_and_can_fail(
        audit_model: AuditModel, clean: CleanRun, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV)
    key = TransformKey.for_config(config)
    assert key.ephemeral
    checks = keyed_checks(config, audit_model.weight, key, clean.prompts)
    assert checks.key == "ephemeral"
    assert checks.identical_prefixes_identical_rows and checks.different_keys_different_rows
    # Without noise no key changes a row: the check reports it rather than passing.
    silent = config.model_copy(update={"sigma": 0.0})
    assert not keyed_checks(silent, audit_model.weight, key,
                            clean.prompts).different_keys_different_rows


def test_a_sweep_runs_the_configured_noise_kind_or_gaussian() -> None:
    keyed = TransformConfig(kind="keyed_gaussian", sigma=1.0, key_env=KEY_ENV)
    module = TransformConfig(kind="module", module="torch.nn:Identity")
    assert [(c.kind, c.sigma) for c in sweep_configs(keyed, [0, 2])] == [
        ("keyed_gaussian", 0.0), ("keyed_gaussian", 2.0)]
    assert {c.kind for c in sweep_configs(module, [1])} == {"gaussian"}
    assert {c.kind for c in sweep_configs(TransformConfig(), [1])} == {"gaussian"}
    with pytest.raises(ValueError, match="sigma"):
        sweep_configs(TransformConfig(), [-1])


# ------------------------------------------------------------------ config and sample


def test_the_gateway_application_is_found_by_its_import_path(tmp_path: Path) -> None:
    assert read_app_config(REPO / "serve_config.yaml") == read_app_config(
        REPO / "serve_config.yaml", "gateway")
    with pytest.raises(ValueError, match="not the gateway"):
        read_app_config(REPO / "serve_config.yaml", "reference")
    with pytest.raises(ValueError, match="no application named"):
        read_app_config(REPO / "serve_config.yaml", "nope")
    two = tmp_path / "two.yaml"
    two.write_text(json.dumps({"applications": [
        {"name": name, "import_path": "serve_app.deployments:build_app",
         "args": {"model": {"served_name": name}}} for name in ("a", "b")]}))
    with pytest.raises(ValueError, match="name one with --app"):
        read_app_config(two)
    assert read_app_config(two, "b").model.name == "b"


def test_the_sample_is_built_in_or_one_text_a_line(tmp_path: Path) -> None:
    assert ("Patient John Q. Smith, SSN 078-05-1120, was diagnosed with stage II melanoma "
            "on 2026-03-14.") in BUILT_IN_SAMPLE
    assert read_sample(None) == list(BUILT_IN_SAMPLE)
    texts = tmp_path / "texts.txt"
    texts.write_text("first text\n\n  second text  \n")
    assert read_sample(texts) == ["first text", "second text"]
    texts.write_text("\n \n")
    with pytest.raises(ValueError, match="no text"):
        read_sample(texts)


def test_nothing_outside_the_package_imports_it() -> None:
    for path in (REPO / "serve_app").rglob("*.py"):
        if "privacy" in path.relative_to(REPO / "serve_app").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.startswith("serve_app.privacy") for n in names), path


# ------------------------------------------------------------------ the command line


def test_the_table_has_a_line_per_sigma_with_its_six_figures(
        sweep: dict[float, AuditResult]) -> None:
    table = cli.render_table(list(sweep.values()), AppConfig(), seed=0).splitlines()
    assert table[0].startswith(f"serve-app-demo: built-in sample, 10 texts, {ROWS} rows")
    lines = table[3:3 + len(SWEEP)]
    three = lines[SWEEP.index(3.0)].split()
    assert three == ["gaussian", "3", "99.7%", "averaging", "78.4%", "74.0%", "85.2%", "27.4%",
                     "3.6074", "12.5%"]
    section = table.index("gaussian sigma 3: attacks, worst first")
    attacks = [line.split()[0] for line in table[section + 1:section + 6]]
    assert attacks == list(sweep[3.0].attacks)
    assert table[section + 1].split()[:2] == ["averaging", "99.7%"]


def test_the_keyed_audit_from_a_config_file_says_its_key_is_ephemeral(
        demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    keys = (f"ephemeral-key-canary-{n:012d}" for n in itertools.count())
    monkeypatch.setattr("secrets.token_urlsafe", lambda _: next(keys))
    config = tmp_path / "serve_config.yaml"
    config.write_text(json.dumps({"applications": [{
        "name": "gateway", "import_path": "serve_app.deployments:build_app",
        "args": {"privacy": {"transform": {"kind": "keyed_gaussian", "key_env": KEY_ENV}}}}]}))
    texts = tmp_path / "texts.txt"
    texts.write_text("Tell me about France.\nWhat is the capital of Japan?\n")

    assert cli.main(["audit", "--config", str(config), "--text-file", str(texts),
                     "--prompts", "1"]) == 0
    out, err = capsys.readouterr()
    assert f"{KEY_ENV} is unset" in err and "ephemeral random key" in err
    assert ("keyed_gaussian sigma 1 (ephemeral key): identical prefixes give identical rows: "
            "yes; different keys give different rows: yes") in out
    assert f"{texts} sample, 2 texts" in out
    assert "canary" not in out + err


def test_python_m_prints_the_issues_json_for_the_configured_transform(
        cache_dir: Path, demo_model_dir: Path, none_result: AuditResult) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serve_app.privacy", "audit", "--config", "serve_config.yaml",
         "--json"], cwd=REPO, env=_subprocess_env(cache_dir), capture_output=True, text=True,
        timeout=300, check=True)
    printed = json.loads(done.stdout)
    assert set(printed) == {"transform", "token_recovery", "attacks", "utility", "samples"}
    assert set(printed["token_recovery"]) == {"l2", "cosine", "top5", "worst", "worst_attack"}
    assert printed["token_recovery"]["worst"] == 1.0
    assert set(printed["attacks"]) == {"nearest_row", "averaging", "linear_map", "row_norms",
                                       "chosen_prefix", "chosen_prefix_other_tenant"}
    assert set(printed["utility"]) == {"next_token_agreement", "mean_kl", "greedy_match"}
    assert printed == none_result.as_json()


def test_the_console_script_sweeps_and_plots(
        cache_dir: Path, demo_model_dir: Path, sweep: dict[float, AuditResult],
        tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    script = Path(sys.executable).with_name("serve-app-audit")
    done = subprocess.run(
        [str(script), "--sweep", "2,3", "--json", "--plot", str(plot)], cwd=REPO,
        env=_subprocess_env(cache_dir), capture_output=True, text=True, timeout=300,
        check=True)
    printed = json.loads(done.stdout)
    assert isinstance(printed, list)
    assert printed == [sweep[2.0].as_json(), sweep[3.0].as_json()]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
