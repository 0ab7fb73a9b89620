"""Prompts: from client text, chat messages and client tensors to the prompt embeddings
sent upstream: the model's files (tokenizer, input-embedding matrix), the length bound on
text, the chat template, the wire format and its safe decode, and the embedding lookup.

Layer: above the ground (config, errors, limits, protocol); used by `upstream`,
`sentence`, `reference` and `api`.
"""
