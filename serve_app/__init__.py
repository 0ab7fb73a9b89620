"""serve_app: an OpenAI-compatible gateway that sends only prompt embeddings upstream.

Layers, each importing only from those below it (docs/architecture.md):
- edge: `deployments` (Serve shells, app builders, deployment options), `handles` (the
  pipeline over deployment handles), `allocator`, `proxy_guard` (what a client may not
  tell Serve's proxy);
- `api`: the FastAPI app and its guards, and one package per API (its router and service);
- `upstream` (Dispatcher and fleet), `sentence` (sentence embeddings) and `reference` (the
  embedded upstream), side by side;
- `prompts`: tokenizer, chat template, wire format, embedding lookup;
- ground: `protocol`, `errors`, `endpoint`, `limits`, `config`, `envs`, and under them
  `observability` (the metrics, request ids and access records).
`deploy` stands apart from the request path. `demo` joins it where the config names a demo
model (the shipped `serve_config.yaml` does): each replica that loads a model (Gateway,
Embedder, Encoder, the reference upstream) builds it, or finds it in the cache, as it starts.
"""

__version__ = "0.1.0"
