"""serve_app: an OpenAI-compatible gateway that sends only prompt embeddings upstream."""

__version__ = "0.1.0"
