"""Sentence embeddings: the encoder models and the OpenAI `/v1/embeddings` and Cohere
`/v2/embed` service on top of them.

Layer: above `prompts`; beside `upstream` and `reference`; used by `api`.
"""
