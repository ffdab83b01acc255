"""KServe v2 / Open Inference Protocol routes."""

ROUTES: list = []
