"""One Embedder batch holds many requests' prompts: plain token ids beside a chat whose
`prompt_embeds` part makes it a `SplicedPrompt`, and a completions request's client tensor
alone. Whatever shares its batch, each prompt's token rows go upstream transformed (and, under
a keyed transform, exactly as they would alone); client rows stay as sent."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from serve_app.config import ModelConfig, TransformConfig, TransformKind
from serve_app.prompts.embedder import EmbedderCore, PromptInput, SplicedPrompt
from serve_app.prompts.untrusted import EmbedsSpec, decode_prompt_embeds

KEY_ENV = "SERVE_APP_TEST_MIXED_BATCH_KEY"
HIDDEN = 64  # the demo model's

CLIENT = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(0))
PLAIN_FIRST, PLAIN_LAST = [0, 40, 41, 42, 43], [7, 8]
CHAT = SplicedPrompt(([1, 50, 51], CLIENT, [52, 2]))
CLIENT_ONLY = SplicedPrompt((CLIENT,))  # a completions request's prompt_embeds
BATCH: list[PromptInput] = [PLAIN_FIRST, CHAT, CLIENT_ONLY, PLAIN_LAST]
TENANTS = ["tenant-a", "tenant-b", "tenant-b", "tenant-a"]
PLAIN = {0: PLAIN_FIRST, 3: PLAIN_LAST}
"""The plain prompts' places in the batch."""


def noisy_core(model_dir: Path, kind: TransformKind) -> EmbedderCore:
    config = TransformConfig(kind=kind, sigma=1.0, key_env=KEY_ENV)
    return EmbedderCore.from_checkpoint(model_dir, ModelConfig(), config)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "mixed-batch-key-0123456789")


@pytest.fixture(params=["keyed_gaussian", "gaussian"])
def core(request: pytest.FixtureRequest, demo_model_dir: Path) -> EmbedderCore:
    return noisy_core(demo_model_dir, request.param)


def decoded(core: EmbedderCore, encoded: Sequence[bytes]) -> list[torch.Tensor]:
    spec = EmbedsSpec(hidden_size=HIDDEN, max_rows=512, max_bytes=512 * HIDDEN * 4,
                      dtype=core.dtype)
    return [decode_prompt_embeds(data, spec) for data in encoded]


def assert_sent_as_configured(core: EmbedderCore, sent: list[torch.Tensor]) -> None:
    """Every token row transformed (no row equals its lookup); client rows as sent."""
    raw = core.lookup(BATCH)
    for index in PLAIN:
        assert (sent[index] != raw[index]).any(dim=1).all(), f"plain prompt {index}"
    chat = sent[1]
    assert (chat[:3] != raw[1][:3]).any(dim=1).all() and (chat[6:] != raw[1][6:]).any(dim=1).all()
    assert torch.equal(chat[3:6], CLIENT) and torch.equal(sent[2], CLIENT)


def test_rows(core: EmbedderCore) -> None:
    assert_sent_as_configured(core, core.rows(BATCH, TENANTS))


def test_embed_batch(core: EmbedderCore) -> None:
    encoded = core.embed_batch(BATCH, TENANTS)
    assert [item.rows for item in encoded] == [5, 8, 3, 2]
    assert_sent_as_configured(core, decoded(core, [item.data for item in encoded]))


def test_embed_measured(core: EmbedderCore) -> None:
    encoded, stats = core.embed_measured(BATCH, TENANTS)
    assert (stats.prompts, stats.rows) == (4, 18) and "transform" in stats.stage_seconds
    assert_sent_as_configured(core, decoded(core, [item.data for item in encoded]))


def test_keyed_rows_are_the_prompts_own_whatever_shares_the_batch(
    demo_model_dir: Path,
) -> None:
    """Under a keyed transform a plain prompt's rows are a function of its tenant and its
    tokens: in a mixed batch they equal those it gets in a batch of its own."""
    core = noisy_core(demo_model_dir, "keyed_gaussian")
    mixed = core.rows(BATCH, TENANTS)
    for index, ids in PLAIN.items():
        [alone] = core.rows([ids], [TENANTS[index]])
        assert torch.equal(mixed[index], alone), f"plain prompt {index}"
