"""Crafted payloads against the real Serve graph: 400s, and the replicas keep serving."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.unit.test_hostile_embeds import CORPUS

pytestmark = pytest.mark.integration


def test_hostile_payloads_then_normal_service(  # type: ignore[no-untyped-def]
    client, serve_graph, tmp_path: Path
) -> None:
    before = len(serve_graph.proxy.bodies)
    for name, build in CORPUS.items():
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=serve_graph.model, prompt="", max_tokens=4,
                                      extra_body={"prompt_embeds": build(tmp_path)})
        assert not (tmp_path / "pwned").exists(), name
    assert len(serve_graph.proxy.bodies) == before
    answer = client.completions.create(model=serve_graph.model, prompt="Tell me about France",
                                       max_tokens=4, temperature=0)
    assert answer.choices[0].text
