"""Observability: what the gateway tells about itself, never a request's text.

`metrics` defines every Prometheus metric of every stage, with the functions that record
them; `request_id` and `access` carry each request's id and its access record. Under the
ground layer: it imports only Ray, orjson (the access log's JSON line) and the standard
library, so every layer may record through it. docs/observability.md lists the exported
series and the dashboard.
"""
