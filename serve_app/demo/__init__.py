"""The demo models, built locally with no network: a tiny causal LM with a chat template
and a tiny sentence encoder, so the default config runs anywhere. Not on the request path.
"""
