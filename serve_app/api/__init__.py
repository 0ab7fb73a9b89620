"""The gateway's HTTP surface: the FastAPI app, its guards, routes and OpenAPI document;
one package per API, each its route and service (`completions`, `chat`, `embeddings`,
`cohere`), and what the completions and chat services share of the served model
(`served_model`).

Layer: above `prompts`, `upstream` and `sentence`; wrapped by `deployments`.
"""
