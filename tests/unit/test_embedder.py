"""EmbedderCore and the checkpoint loader: the lookup equals the model's own embedding layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from serve_app.config import ModelConfig
from serve_app.prompts.checkpoint import ModelSpec, load_input_embeddings, read_model_spec
from serve_app.prompts.embedder import EmbedderCore, EmbedRequest, SplicedPrompt
from serve_app.prompts.untrusted import EmbedsSpec, decode_prompt_embeds

# Different lengths in one batch, including a single token and the whole vocabulary.
BATCH = [[0, 54, 71, 78], [7], list(range(262)), [258, 0, 258, 3, 3, 3, 100, 1, 2]]


@pytest.fixture(scope="module")
def core(demo_model_dir: Path) -> EmbedderCore:
    return EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig())


def reference_rows(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids))


def test_lookup_equals_model_embedding(core: EmbedderCore, demo_causal_lm: Any) -> None:
    assert core.dtype == torch.float32
    assert core.weight.shape == (262, 64)
    rows = core.lookup(BATCH)
    assert len(rows) == len(BATCH)
    for ids, got in zip(BATCH, rows, strict=True):
        assert got.device.type == "cpu"
        assert got.shape == (len(ids), 64)
        assert torch.equal(got, reference_rows(demo_causal_lm, ids))


def test_embed_batch_round_trips_through_codec(core: EmbedderCore, demo_causal_lm: Any) -> None:
    spec = EmbedsSpec(hidden_size=64, max_rows=512, max_bytes=512 * 64 * 4, dtype=torch.float32)
    encoded = core.embed_batch(BATCH)
    assert [item.rows for item in encoded] == [len(ids) for ids in BATCH]
    for ids, item in zip(BATCH, encoded, strict=True):
        assert torch.equal(
            decode_prompt_embeds(item.data, spec), reference_rows(demo_causal_lm, ids)
        )
    # Each prompt carries only its own rows, not the whole batch's lookup.
    single, whole_vocab = encoded[1], encoded[2]
    assert len(single.data) * 10 < len(whole_vocab.data)


class RecordingTransform:
    """A transform that changes nothing and records each batch's lengths and tenants."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[int], list[str]]] = []

    def __call__(self, rows: torch.Tensor, ids: torch.Tensor, lengths: list[int],
                 tenants: list[str]) -> torch.Tensor:
        self.batches.append((list(lengths), list(tenants)))
        return rows


def test_embed_requests_answers_each_request_its_own_prompts(
    core: EmbedderCore, demo_causal_lm: Any
) -> None:
    """One call per request: a Serve batch's requests are looked up together, at most
    `max_prompts` prompts at a time, each prompt with its request's tenant, and each
    request gets back its own prompts' rows in its order."""
    transform = RecordingTransform()
    recording = EmbedderCore(core.weight, transform)  # type: ignore[arg-type]
    requests = [EmbedRequest(([1, 2, 3], [4]), "tenant-a"), EmbedRequest(([5],), "tenant-b"),
                EmbedRequest(([6, 7], [8], [9, 10, 11]), "tenant-c")]
    answers, costs = recording.embed_requests(requests, max_prompts=4)

    assert [[item.rows for item in answer] for answer in answers] == [[3, 1], [1], [2, 1, 3]]
    spec = EmbedsSpec(hidden_size=64, max_rows=512, max_bytes=512 * 64 * 4, dtype=torch.float32)
    for request, answer in zip(requests, answers, strict=True):
        for ids, item in zip(request.prompts, answer, strict=True):
            assert isinstance(ids, list)
            assert torch.equal(decode_prompt_embeds(item.data, spec),
                               reference_rows(demo_causal_lm, ids))
    assert transform.batches == [
        ([3, 1, 1, 2], ["tenant-a", "tenant-a", "tenant-b", "tenant-c"]),
        ([1, 3], ["tenant-c", "tenant-c"])]
    assert [cost.prompts for cost in costs] == [4, 2]
    assert [cost.rows for cost in costs] == [7, 4]


def test_spliced_prompts_join_lookups_and_client_tensors(
    core: EmbedderCore, demo_causal_lm: Any
) -> None:
    client = torch.randn(3, 64, dtype=torch.float64)  # cast to the model's dtype on the way
    spliced = SplicedPrompt(([0, 54], client, [71], torch.ones(1, 64)))
    assert spliced.rows == 7
    plain, got, tail = core.lookup([[5, 6], spliced, [258]])
    expected = torch.cat([reference_rows(demo_causal_lm, [0, 54]), client.float(),
                          reference_rows(demo_causal_lm, [71]), torch.ones(1, 64)])
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert torch.equal(plain, reference_rows(demo_causal_lm, [5, 6]))
    assert torch.equal(tail, reference_rows(demo_causal_lm, [258]))
    [only_tensor] = core.lookup([SplicedPrompt((client,))])
    assert torch.equal(only_tensor, client.float())


def test_bfloat16_weight_is_fp32_weight_cast(core: EmbedderCore, demo_model_dir: Path) -> None:
    bf16 = EmbedderCore.from_checkpoint(demo_model_dir, ModelConfig(dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.weight, core.weight.to(torch.bfloat16))
    assert bf16.lookup([[5, 6]])[0].dtype == torch.bfloat16


def test_embedder_core_rejects_non_matrix() -> None:
    with pytest.raises(ValueError, match="vocab, hidden"):
        EmbedderCore(torch.zeros(3))


def test_read_model_spec_of_demo(demo_model_dir: Path) -> None:
    assert read_model_spec(demo_model_dir, ModelConfig()) == ModelSpec(
        hidden_size=64, vocab_size=262, max_model_len=512, dtype=torch.float32
    )
    overridden = read_model_spec(demo_model_dir, ModelConfig(max_model_len=100, dtype="float16"))
    assert overridden.max_model_len == 100
    assert overridden.dtype == torch.float16
    assert overridden.hidden_size == 64


def _tiny_llama(tmp_path: Path, tied: bool, max_shard_size: str | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp_path, **kwargs)
    return model


def test_loads_embedding_from_sharded_checkpoint(tmp_path: Path) -> None:
    model = _tiny_llama(tmp_path, tied=False, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    assert index.exists()
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1, "the checkpoint is not actually sharded"
    assert not (tmp_path / "model.safetensors").exists()

    expected = model.get_input_embeddings().weight.detach()
    # The lm_head differs, so picking the wrong tensor would be noticed.
    assert not torch.equal(expected, model.lm_head.weight.detach())
    loaded = load_input_embeddings(tmp_path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, expected)

    core = EmbedderCore.from_checkpoint(tmp_path, ModelConfig())
    assert torch.equal(core.lookup([[1, 99, 50]])[0], expected[[1, 99, 50]])


def test_loads_embedding_of_tied_checkpoint(tmp_path: Path) -> None:
    model = _tiny_llama(tmp_path, tied=True)
    expected = model.get_input_embeddings().weight.detach()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(load_input_embeddings(tmp_path), expected)
    assert torch.equal(load_input_embeddings(tmp_path, torch.bfloat16), expected.bfloat16())


def test_tied_checkpoint_storing_only_lm_head(tmp_path: Path) -> None:
    """A tied checkpoint that names the shared matrix `lm_head.weight` still loads."""
    model = _tiny_llama(tmp_path, tied=True)
    expected = model.get_input_embeddings().weight.detach()
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    embedding = tensors.pop("model.embed_tokens.weight")
    tensors.pop("lm_head.weight", None)
    tensors["lm_head.weight"] = embedding
    save_file(tensors, file, metadata={"format": "pt"})
    with safe_open(str(file), framework="pt") as handle:
        assert "model.embed_tokens.weight" not in handle.keys()
    assert torch.equal(load_input_embeddings(tmp_path), expected)


@pytest.mark.parametrize("weights", [True, False])
def test_hub_download_skips_weights_only_where_they_are_not_read(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, weights: bool) -> None:
    import huggingface_hub

    from serve_app.prompts.checkpoint import resolve_model_dir

    asked: dict[str, Any] = {}

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        asked.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_dir(ModelConfig(source="org/llm"), weights=weights) == tmp_path
    assert asked["repo_id"] == "org/llm"
    assert ("*.safetensors" in asked["ignore_patterns"]) is not weights
    assert "*.bin" in asked["ignore_patterns"]
