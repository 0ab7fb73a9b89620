"""Sentence embeddings: the encoder models, and what OpenAI `/v1/embeddings` and Cohere
`/v2/embed` share on top of them (`service`); each API's own part is in `api`.

Layer: above `prompts`; beside `upstream` and `reference`; used by `api`.
"""
