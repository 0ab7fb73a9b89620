"""Upstream: the fleet of NIM / vLLM servers and the Dispatcher that sends them prompt
embeddings: the call, the wire format, failures and failover, health and routing, and
the shaping of their answers for the client.

Layer: above `prompts`; beside `sentence` and `reference`; used by `api`.
"""
