"""OpenAI embeddings (`/v1/embeddings`): the route (`router`) and the service that shapes
the sentence models' vectors into OpenAI's answer (`serving`)."""

from serve_app.api.embeddings.router import attach
from serve_app.api.embeddings.serving import EmbeddingsService

__all__ = ["EmbeddingsService", "attach"]
