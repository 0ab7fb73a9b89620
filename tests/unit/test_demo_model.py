"""The demo model: reproducible builds, its tokenizer, and output that reads as words."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from serve_app.demo import model as demo_model
from serve_app.demo.model import build_demo_model, ensure_demo_model

PROMPT = "Tell me about France"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_builds_are_byte_identical(tmp_path: Path, demo_model_dir: Path) -> None:
    """A fresh build equals the session's cached one (also built by build_demo_model, into
    its own temporary staging directory, earlier in this process and under other state)."""
    threads = torch.get_num_threads()
    torch.manual_seed(42)
    expected_draw = torch.rand(3)
    torch.manual_seed(42)
    fresh = build_demo_model(tmp_path / "fresh")
    # The build forks the RNG and restores the thread count: the caller's state is intact.
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected_draw)

    assert fresh != demo_model_dir
    assert sha256(fresh / "model.safetensors") == sha256(demo_model_dir / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (fresh / name).read_bytes() == (demo_model_dir / name).read_bytes(), name


def test_tokenizer_adds_bos_and_round_trips(demo_tokenizer: Any) -> None:
    ids = demo_tokenizer(PROMPT).input_ids
    bos = demo_tokenizer.convert_tokens_to_ids("<s>")
    assert bos == demo_tokenizer.bos_token_id
    assert ids[0] == bos
    assert bos not in ids[1:]
    assert demo_tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert demo_tokenizer.decode(ids) == "<s>" + PROMPT


def test_greedy_generation_reads_as_words(demo_tokenizer: Any, demo_causal_lm: Any) -> None:
    ids = demo_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        output = demo_causal_lm.generate(ids, max_new_tokens=24, do_sample=False)
    assert torch.equal(output[0, : ids.shape[1]], ids[0])
    text = demo_tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    assert "France" in text or "Paris" in text, text
    # Readable: printable ASCII, mostly letters and spaces.
    assert text.isascii() and text.isprintable(), text
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    assert letters >= 0.8 * len(text), text
    assert re.search(r"\b[a-z]{2,}\b", text), text


def test_chat_template_ends_with_assistant_turn(demo_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    rendered = demo_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<s>")
    assert f"<|user|>\n{PROMPT}\n" in rendered
    assert rendered.endswith("<|assistant|>\n")
    without = demo_tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, tokenize=False
    )
    assert not without.endswith("<|assistant|>\n")


def test_turn_markers_are_special_tokens(demo_tokenizer: Any) -> None:
    """As in real chat models: the template's markers are single special-token ids, and the
    same characters typed as text (`chat_special_tokens: text`) are other ids."""
    rendered = demo_tokenizer.apply_chat_template(
        [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}],
        add_generation_prompt=True, return_dict=False)
    markers = [demo_tokenizer.convert_tokens_to_ids(m) for m in demo_model.TURN_MARKERS]
    assert all(demo_tokenizer.added_tokens_decoder[i].special for i in markers)
    assert [i for i in rendered if i in markers] == markers  # system, user, assistant
    for marker, marker_id in zip(demo_model.TURN_MARKERS, markers, strict=True):
        as_text = demo_tokenizer(marker, add_special_tokens=False,
                                 split_special_tokens=True).input_ids
        assert len(as_text) == len(marker) and marker_id not in as_text
    # Bytes keep their ids: the markers come after the byte alphabet.
    assert min(markers) == len(demo_tokenizer) - len(markers)


def test_chat_answers_in_words(demo_tokenizer: Any, demo_causal_lm: Any) -> None:
    """The markers' rows are trained on the demo text's questions as chats."""
    ids = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Germany?"}],
        add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        output = demo_causal_lm.generate(torch.tensor([ids]), max_new_tokens=32,
                                         do_sample=False)
    text = demo_tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
    assert text.startswith("The capital of Germany is Berlin"), text


def test_a_question_without_turn_markers_is_continued_as_text(
    demo_tokenizer: Any, demo_causal_lm: Any
) -> None:
    """Chats ask the same questions: a completions prompt still opens no assistant turn."""
    ids = demo_tokenizer("What is the capital of France?").input_ids
    with torch.no_grad():
        output = demo_causal_lm.generate(torch.tensor([ids]), max_new_tokens=24,
                                         do_sample=False)
    continuation = output[0, len(ids):].tolist()
    markers = demo_tokenizer.convert_tokens_to_ids(demo_model.TURN_MARKERS)
    assert not set(markers) & set(continuation)
    assert demo_tokenizer.decode(continuation).startswith(" The capital of France")


def test_a_new_recipe_is_built_beside_an_old_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache is named by the builder's source: an edit to it (or to the demo text) is
    a new build, never a stale one."""
    from serve_app.demo import text

    builds: list[Path] = []

    def build(target: Path) -> Path:
        builds.append(target)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(demo_model, "build_demo_model", build)
    first = ensure_demo_model(tmp_path)
    assert ensure_demo_model(tmp_path) == first and len(builds) == 1
    edited = tmp_path / "text.py"
    edited.write_text(Path(str(text.__file__)).read_text() + "# edited\n")
    monkeypatch.setattr(text, "__file__", str(edited))
    second = ensure_demo_model(tmp_path)
    assert second != first and len(builds) == 2
    assert (first / "config.json").exists() and (second / "config.json").exists()


def test_ensure_demo_model_reuses_the_cache(
    cache_dir: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = demo_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def no_rebuild(target: Path) -> Path:
        raise AssertionError("ensure_demo_model rebuilt a cached model")

    monkeypatch.setattr(demo_model, "build_demo_model", no_rebuild)
    assert ensure_demo_model(cache_dir) == demo_model_dir
    assert weights.stat().st_mtime_ns == before
    # No staging directories are left behind in the cache.
    assert not list(cache_dir.glob(".*-build-*"))


def test_demo_encoder_builds_identically(tmp_path: Path, demo_encoder_dir: Path) -> None:
    from serve_app.demo.encoder import build_demo_encoder

    again = build_demo_encoder(tmp_path / "again")
    for name in ("model.safetensors", "modules.json", "1_Pooling/config.json", "vocab.txt"):
        assert (again / name).read_bytes() == (demo_encoder_dir / name).read_bytes(), name
