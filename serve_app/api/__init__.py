"""The gateway's HTTP surface: the FastAPI app, its guards, routes and OpenAPI document,
and the completions service that turns requests into prompts for the pipeline.

Layer: above `prompts`, `upstream` and `sentence`; wrapped by `deployments`.
"""
