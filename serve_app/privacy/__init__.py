"""The inversion audit: what an upstream holding the model's weights reads back from the
prompt embeddings a transform leaves, and what the transform costs in answers.

An offline tool beside the gateway (`serve-app-audit`, `python -m serve_app.privacy
audit`): it loads the whole model, which the gateway never does, and nothing on the request
path imports it. docs/privacy.md has what it measures and the demo model's figures.
"""
