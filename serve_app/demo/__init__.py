"""The demo models, built locally with no network: a tiny causal LM with a chat template
and a tiny sentence encoder, so the default config runs anywhere.

On the request path where the config names them (the shipped `serve_config.yaml` does):
`prompts.checkpoint.resolve_model_dir` and `sentence.encoder.resolve_encoder_dir` build
them, or find them in the cache, as each replica that loads a model starts.
"""
