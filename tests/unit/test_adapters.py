"""Prompt adapters as PEFT saves them: read and checked (`prompts.adapters`), and the rows
the Embedder makes with them equal to the rows PEFT gives the model."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.config import AdapterConfig, AppConfig, ModelConfig, TransformConfig
from serve_app.prompts.adapters import AdapterError, load_prompt_adapter
from serve_app.prompts.checkpoint import ModelSpec, read_model_spec
from serve_app.prompts.codec import encode_prompt_embeds
from serve_app.prompts.embedder import EmbedderCore, EmbedRequest, SplicedPrompt
from tests.peft_adapters import peft_input_embeds, peft_model

NAME = "tuned"


@pytest.fixture(scope="module")
def spec(demo_model_dir: Path) -> ModelSpec:
    return read_model_spec(demo_model_dir, ModelConfig())


def adapter_at(path: Path) -> AdapterConfig:
    return AdapterConfig(name=NAME, path=str(path))


def copied(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_settings(folder: Path, **changes: Any) -> None:
    settings = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**settings, **changes}))


def saved_tensor(folder: Path) -> torch.Tensor:
    return load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]


# ------------------------------------------------------------------------ reading


@pytest.mark.parametrize("kind", ["prompt_tuning_dir", "p_tuning_dir"])
def test_an_adapter_is_the_tensor_peft_saved(kind: str, spec: ModelSpec,
                                             request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(kind)
    adapter = load_prompt_adapter(adapter_at(folder), spec)
    expected = saved_tensor(folder).to(spec.dtype)
    assert adapter.name == NAME and adapter.rows.dtype == spec.dtype
    assert torch.equal(adapter.rows, expected)
    assert adapter.virtual_tokens == expected.shape[0]
    assert adapter.peft_type == ("P_TUNING" if kind == "p_tuning_dir" else "PROMPT_TUNING")


def test_a_weights_only_bin_is_read_as_the_safetensors_are(
        prompt_tuning_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "bin")
    tensor = saved_tensor(folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"prompt_embeddings": tensor}, folder / "adapter_model.bin")
    assert torch.equal(load_prompt_adapter(adapter_at(folder), spec).rows, tensor)


class _Payload:
    """What a hostile pickle builds: any callable with any argument."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch /tmp/serve-app-adapter-pwned",))


def refusal(folder: Path, spec: ModelSpec) -> str:
    with pytest.raises(AdapterError) as caught:
        load_prompt_adapter(adapter_at(folder), spec)
    message = str(caught.value)
    assert f"adapter {NAME!r}" in message and str(folder) in message
    return message


def test_a_pickle_payload_in_a_bin_is_refused_unrun(
        prompt_tuning_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "hostile")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(
        pickle.dumps({"prompt_embeddings": saved_tensor(prompt_tuning_dir), "x": _Payload()}))
    assert "not a weights-only torch.save file" in refusal(folder, spec)
    assert not Path("/tmp/serve-app-adapter-pwned").exists()


@pytest.mark.parametrize("peft_type", ["LORA", "PREFIX_TUNING", "IA3", None])
def test_other_peft_types_are_refused(peft_type: str | None, prompt_tuning_dir: Path,
                                      spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "other")
    edit_settings(folder, peft_type=peft_type)
    assert f"peft_type {peft_type!r} is not served" in refusal(folder, spec)


def test_a_token_dim_other_than_the_hidden_size_is_refused(
        prompt_tuning_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "dim")
    edit_settings(folder, token_dim=spec.hidden_size * 2)
    assert f"token_dim is {spec.hidden_size * 2}" in refusal(folder, spec)


def test_a_tensor_of_another_shape_than_its_config_says_is_refused(
        prompt_tuning_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "shape")
    save_file({"prompt_embeddings": torch.zeros(3, spec.hidden_size)},
              folder / "adapter_model.safetensors")
    assert "has shape (3, 64)" in refusal(folder, spec)


def test_too_many_virtual_tokens_for_the_context_are_refused(
        prompt_tuning_dir: Path, spec: ModelSpec, tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "long")
    edit_settings(folder, num_virtual_tokens=spec.max_model_len)
    assert "leave no room in the model's context" in refusal(folder, spec)


def test_missing_files_are_refused(prompt_tuning_dir: Path, spec: ModelSpec,
                                   tmp_path: Path) -> None:
    assert "no such folder" in refusal(tmp_path / "absent", spec)
    folder = copied(prompt_tuning_dir, tmp_path / "no-weights")
    (folder / "adapter_model.safetensors").unlink()
    assert "no adapter_model.safetensors or adapter_model.bin" in refusal(folder, spec)
    (folder / "adapter_config.json").unlink()
    assert "no adapter_config.json" in refusal(folder, spec)


def test_non_finite_rows_are_refused(prompt_tuning_dir: Path, spec: ModelSpec,
                                     tmp_path: Path) -> None:
    folder = copied(prompt_tuning_dir, tmp_path / "nan")
    tensor = saved_tensor(folder).clone()
    tensor[0, 0] = float("nan")
    save_file({"prompt_embeddings": tensor}, folder / "adapter_model.safetensors")
    assert "NaN or infinite" in refusal(folder, spec)


def test_adapter_names_are_unique_among_served_names(prompt_tuning_dir: Path) -> None:
    with pytest.raises(ValueError, match="served model names must be unique: serve-app-demo"):
        AppConfig(model=ModelConfig(adapters=[
            AdapterConfig(name="serve-app-demo", path=str(prompt_tuning_dir))]))


# ------------------------------------------------------------------------ rows


@pytest.fixture(scope="module")
def adapted(demo_model_dir: Path, prompt_tuning_dir: Path) -> EmbedderCore:
    config = ModelConfig(adapters=[adapter_at(prompt_tuning_dir)])
    return EmbedderCore.from_checkpoint(demo_model_dir, config)


@pytest.mark.parametrize("kind", ["prompt_tuning_dir", "p_tuning_dir"])
def test_the_rows_are_those_peft_gives_the_model(
        kind: str, demo_model_dir: Path, demo_tokenizer: Any,
        request: pytest.FixtureRequest) -> None:
    folder: Path = request.getfixturevalue(kind)
    core = EmbedderCore.from_checkpoint(demo_model_dir,
                                        ModelConfig(adapters=[adapter_at(folder)]))
    ids = list(demo_tokenizer("What is the capital of France?").input_ids)
    [rows] = core.rows([ids], adapters=[NAME])
    expected = peft_input_embeds(peft_model(demo_model_dir, folder), ids)
    assert rows.shape == expected.shape
    assert torch.equal(rows, expected.to(rows.dtype))


def test_every_prompt_of_a_batch_gets_its_own_adapter_or_none(
        adapted: EmbedderCore, demo_tokenizer: Any) -> None:
    ids = list(demo_tokenizer("Tell me about Japan.").input_ids)
    tensor = adapted.rows([ids])[0][:3].clone()
    lead = adapted.adapters[NAME].rows
    plain, led, spliced = adapted.rows([ids, ids, SplicedPrompt((ids, tensor))],
                                       adapters=[None, NAME, NAME])
    assert torch.equal(led, torch.cat([lead, plain]))
    assert torch.equal(spliced, torch.cat([lead, plain, tensor]))


def test_an_unknown_adapter_is_an_error(adapted: EmbedderCore) -> None:
    with pytest.raises(ValueError, match="no prompt adapter named other"):
        adapted.rows([[1, 2]], adapters=["other"])


@pytest.mark.parametrize("apply", [True, False])
def test_the_transform_covers_adapter_rows_as_configured(
        apply: bool, demo_model_dir: Path, prompt_tuning_dir: Path, demo_tokenizer: Any) -> None:
    config = ModelConfig(adapters=[adapter_at(prompt_tuning_dir)])
    privacy = TransformConfig(kind="gaussian", sigma=1.0, apply_to_adapters=apply)
    core = EmbedderCore.from_checkpoint(demo_model_dir, config, privacy)
    ids = list(demo_tokenizer("Tell me about Japan.").input_ids)
    [rows] = core.rows([ids], adapters=[NAME])
    lead = core.adapters[NAME]
    virtual = lead.virtual_tokens
    assert torch.equal(rows[:virtual], lead.rows) is not apply
    assert not torch.equal(rows[virtual:], core.lookup([ids])[0])  # text rows: always


def test_each_embed_request_of_a_batch_is_led_by_its_own_adapter(
        adapted: EmbedderCore, demo_tokenizer: Any) -> None:
    """The Embedder deployment's path: a batch of requests, one with an adapter."""
    ids = list(demo_tokenizer("Tell me about Japan.").input_ids)
    answers, _ = adapted.embed_requests(
        [EmbedRequest((ids,)), EmbedRequest((ids, ids), adapter=NAME)], max_prompts=2)
    [plain], led = answers
    lead = adapted.adapters[NAME]
    assert plain.rows == len(ids)
    assert [item.rows for item in led] == [lead.virtual_tokens + len(ids)] * 2
    [expected] = adapted.rows([ids], adapters=[NAME])
    assert all(item.data == encode_prompt_embeds(expected).data for item in led)
