"""The guard in front of Serve's own request handling: what a client may not tell Serve.

Serve 2.60 reads a request's `X-Request-Id` (into every log line of the request) and a few
headers as instructions to itself, and answers `/-/routes` with every application's
prefix, all before the gateway app sees the request. Serve takes middleware for its own
HTTP servers from the function named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, and
the HAProxy binary it runs from `RAY_SERVE_HAPROXY_BINARY_PATH`; the cluster manifests set
both, and docs/security.md says what each mode leaves to a load balancer.

- `rules`: the headers removed and the path refused (no Ray import: HAProxy's wrapper
  reads it);
- `asgi`: the middleware for Serve's Python proxy and its ingress replicas' servers;
- `haproxy`: the wrapper that adds the same rules to the HAProxy config Serve writes.
"""

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "serve_app.proxy_guard.asgi:proxy_middlewares"
HAPROXY_BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
