"""OpenAI models (`/v1/models`, `/v1/models/{id}`): the routes (`router`) and the model
cards they answer with (`serving`)."""

from serve_app.api.models.router import attach
from serve_app.api.models.serving import ModelsService

__all__ = ["ModelsService", "attach"]
