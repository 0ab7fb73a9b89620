"""OpenAI completions (`/v1/completions`): the route (`router`) and the service that turns a
request's prompts into the pipeline's call (`serving`)."""

from serve_app.api.completions.router import attach
from serve_app.api.completions.serving import CompletionsService

__all__ = ["CompletionsService", "attach"]
