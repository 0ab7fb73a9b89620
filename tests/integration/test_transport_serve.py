"""Both transports between replicas in the real Serve graph: the suite's gateway sends
requests of up to `BY_VALUE_MAX_BYTES` of embeddings by value (Serve's gRPC channel),
larger ones by reference (Ray's object store). Each must deliver the prompt's exact
embeddings upstream, streamed or not."""

from __future__ import annotations

import io

import orjson
import pybase64
import pytest
import torch

from serve_app.prompts.codec import base64_length
from tests.integration.conftest import BY_VALUE_MAX_BYTES

pytestmark = pytest.mark.integration

SHORT = "Tell me about France"
LONG = "Tell me about France, its rivers and its towns. " * 6


def _upstream_tensor(body: bytes) -> torch.Tensor:
    data = pybase64.b64decode(orjson.loads(body)["prompt_embeds"], validate=True)
    tensor: torch.Tensor = torch.load(io.BytesIO(data), weights_only=True)
    return tensor


@pytest.mark.parametrize(("prompt", "by_value"), [(SHORT, True), (LONG, False)])
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_gets_the_prompts_exact_embeddings(  # type: ignore[no-untyped-def]
    client, serve_graph, demo_tokenizer, demo_causal_lm, prompt, by_value, stream
) -> None:
    ids = demo_tokenizer(prompt).input_ids
    weight = demo_causal_lm.get_input_embeddings().weight
    payload = base64_length(len(ids) * weight.shape[1] * weight.element_size())
    assert (payload <= BY_VALUE_MAX_BYTES) == by_value

    before = len(serve_graph.proxy.bodies)
    response = client.completions.create(model=serve_graph.model, prompt=prompt, max_tokens=8,
                                         temperature=0, stream=stream)
    text = ("".join(c.choices[0].text for c in response if c.choices) if stream
            else response.choices[0].text)
    assert text

    [body] = serve_graph.proxy.bodies[before:]
    with torch.no_grad():
        expected = demo_causal_lm.get_input_embeddings()(torch.tensor(ids))
    torch.testing.assert_close(_upstream_tensor(body), expected, rtol=0, atol=0)


def test_a_request_over_the_limit_in_total_goes_whole(client, serve_graph) -> None:  # type: ignore[no-untyped-def]
    """Several short prompts that together pass the limit: one upstream call, all there."""
    prompts = [SHORT + f" {index}" for index in range(16)]
    before = len(serve_graph.proxy.bodies)
    response = client.completions.create(model=serve_graph.model, prompt=prompts,
                                         max_tokens=2, temperature=0)
    assert sorted(choice.index for choice in response.choices) == list(range(16))
    [body] = serve_graph.proxy.bodies[before:]
    assert len(orjson.loads(body)["prompt_embeds"]) == 16
