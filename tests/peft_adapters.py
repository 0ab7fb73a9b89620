"""Soft prompts trained and saved by PEFT itself on the demo model, and PEFT's own greedy
answers with them: what the gateway's adapters are held to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TRAINING_TEXT = "the quick brown fox jumps over the lazy dog. " * 2
"""What the soft prompts learn to lead towards: a few dozen steps move the tiny demo
model's greedy answers, where random soft prompts barely do."""

STEPS = 40


def train_adapter(model_dir: Path, target: Path, peft_type: str,
                  virtual_tokens: int = 8) -> Path:
    """A `peft_type` (PROMPT_TUNING or P_TUNING) adapter of the demo model, trained for
    `STEPS` Adam steps on `TRAINING_TEXT` and saved with `save_pretrained` into `target`."""
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings: Any = (
        PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
        if peft_type == "PROMPT_TUNING" else
        PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens,
                            encoder_hidden_size=32))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), settings)
    ids = torch.tensor([tokenizer(TRAINING_TEXT).input_ids])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(target))
    return target


def peft_model(model_dir: Path, adapter_dir: Path) -> Any:
    """The adapter as PEFT serves it: `PeftModel.from_pretrained` over the demo model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def peft_greedy(model: Any, ids: list[int], max_tokens: int, use_cache: bool = False) -> list[int]:
    """PEFT's greedy continuation of `ids` (up to its end-of-text token, as the reference
    upstream's): the new token ids only."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                             max_new_tokens=max_tokens, do_sample=False, use_cache=use_cache)
    return [int(i) for i in out[0, len(ids):]]


def peft_input_embeds(model: Any, ids: list[int]) -> torch.Tensor:
    """The rows PEFT hands the base model for `ids`: caught at the decoder's input."""
    caught: list[torch.Tensor] = []

    def catch(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        caught.append(kwargs["inputs_embeds"].detach().clone())

    hook = model.get_base_model().model.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        hook.remove()
    return caught[0][0]
