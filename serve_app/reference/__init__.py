"""The reference upstream: a small vLLM-compatible `/v1/completions` server that accepts
only prompt embeddings and generates from them, the embedded default upstream.

Layer: above `prompts`; beside `upstream` and `sentence`; deployed by `deployments`.
"""
