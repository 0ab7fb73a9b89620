"""Deploy-time tools, not on the request path: the cluster config renderer and the
configuration reference generator."""
