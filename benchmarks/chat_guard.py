"""What the turn-marker guard costs: the start-up probe, and each chat's render.

    PYTHONPATH=. python benchmarks/chat_guard.py [--repeats 20]

On the demo tokenizer (byte-level, so a character is a token), with its own template
(special-token markers) and with a Llama-2-style one (plain-text `[INST]` markers), it
times `ChatTemplate(...)` (the probe) and `ChatTemplate.render` of a four-message chat
whose text totals 1k, 10k and 100k characters, under `tokenization.chat_turn_markers`
allow (no guard), escape and refuse. The render's extra work under the guard: a regex
search of each text, the chat's neutral twin rendered and tokenized, and its marker
counts compared. Prints a Markdown table; median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from serve_app import envs
from serve_app.demo.model import ensure_demo_model
from serve_app.prompts.chat_template import ChatTemplate
from serve_app.protocol import ChatCompletionRequest

LLAMA2_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + m['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)
SENTENCE = "The capital of France is Paris, a city on the river Seine. "


def chat(chars: int) -> ChatCompletionRequest:
    text = (SENTENCE * (chars // len(SENTENCE) // 4 + 1))[: chars // 4]
    roles = ["system", "user", "assistant", "user"]
    return ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": role, "content": text} for role in roles]})


def median_seconds(call: Callable[..., object], repeats: int, *args: Any,
                   **kwargs: Any) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_demo_model(envs.cache_dir()))
    print(f"{platform.machine()}, {platform.python_version()}; median of {args.repeats}\n")
    print("| template | policy | probe ms | render 1k ms | 10k ms | 100k ms |")
    print("|---|---|---|---|---|---|")
    for name, template in (("demo", None), ("llama2-style", LLAMA2_STYLE)):
        for policy in ("allow", "escape", "refuse"):
            probe = median_seconds(ChatTemplate, args.repeats, tokenizer, template,
                                   turn_markers=policy)
            renderer = ChatTemplate(tokenizer, template, turn_markers=policy)
            renders = [median_seconds(renderer.render, args.repeats, chat(n))
                       for n in (1_000, 10_000, 100_000)]
            cells = " | ".join(f"{1000 * t:.2f}" for t in [probe, *renders])
            print(f"| {name} | {policy} | {cells} |")


if __name__ == "__main__":
    main()
