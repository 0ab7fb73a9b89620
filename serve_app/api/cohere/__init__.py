"""Cohere embed (`/v2/embed`): the route (`router`) and the service that shapes the
sentence models' vectors into Cohere's answer and its encodings (`serving`)."""

from serve_app.api.cohere.router import attach
from serve_app.api.cohere.serving import CohereEmbedService

__all__ = ["CohereEmbedService", "attach"]
