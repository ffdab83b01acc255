"""GET /metrics in Prometheus format."""

ROUTES: list = []
