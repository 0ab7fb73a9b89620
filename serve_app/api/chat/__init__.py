"""OpenAI chat completions (`/v1/chat/completions`): the route (`router`) and the service
that templates a request's messages into one prompt for the pipeline (`serving`)."""

from serve_app.api.chat.router import attach
from serve_app.api.chat.serving import ChatService

__all__ = ["ChatService", "attach"]

