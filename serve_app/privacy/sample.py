"""The text the audit measures on: the built-in sample, or an operator's file.

The built-in sample mixes sentences with personal data of the kinds a prompt carries (names,
an SSN, a diagnosis, an account, a password) with sentences in the style of the demo
model's training text (`serve_app.demo.text`), whose greedy continuations are words, so a
changed continuation means something. Every name, number and address is made up.
"""

from __future__ import annotations

from pathlib import Path

BUILT_IN_SAMPLE: tuple[str, ...] = (
    "Patient John Q. Smith, SSN 078-05-1120, was diagnosed with stage II melanoma on "
    "2026-03-14.",
    "Tell me about France.",
    "Please wire 4,250 dollars from account 4485 2211 0937 1164 to Maria Lopez.",
    "What is the capital of Germany?",
    "Call Dr. Amy Chen at 555-013-2741 or amy.chen@example.org about the biopsy results.",
    "Tell me about Japan. Japan is a country in east Asia.",
    "My password is hunter2-Blue-Falcon and I live at 12 Elm Street, Springfield.",
    "What is the capital of Italy? The capital of Italy is",
    "The sun is a star. The earth moves around the sun once a year.",
    "Tell me about Spain.",
)
"""Short texts, first the ones most worth the greedy prompts (`--prompts` takes the first)."""


def read_sample(path: Path | None) -> list[str]:
    """The built-in sample, or the non-blank lines of `path`, one text a line."""
    if path is None:
        return list(BUILT_IN_SAMPLE)
    texts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts
