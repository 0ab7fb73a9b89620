"""The gateway's HTTP surface: the FastAPI app (`app`), its guards (`middleware`,
`request_log`) and OpenAPI document (`openapi`); one package per API, each a router and
its serving class (`health`, `models`, `completions`, `chat`, `embeddings`, `cohere`); what
completions and chat share of the served model (`served_model`), and the `Pipeline` it
calls (`pipeline`).

Layer: above `prompts`, `upstream` and `sentence`; wrapped by `deployments`.
"""
