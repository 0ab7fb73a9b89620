"""The inversion audit: what an adversary reads back from the prompt embeddings a transform
leaves (the upstream operator, who holds the model's weights, reads every byte sent, sees
many requests and may also be a client: an attack suite), and what the transform costs in
answers.

An offline tool beside the gateway (`serve-app-audit`, `python -m serve_app.privacy
audit`): it loads the whole model, which the gateway never does, and nothing on the request
path imports it. docs/privacy.md has what it measures and the demo model's figures.
"""
