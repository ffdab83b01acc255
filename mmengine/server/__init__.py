"""Network faces of the Engine: the binary TCP protocol (tcp.py) and HTTP
(http.py) with its protocols: KServe v2 (kserve.py), the SageMaker
multi-model contract (sagemaker.py) and Prometheus metrics (metrics.py)."""


def http_routes() -> list:
    """Every HTTP route mmengine serves, as (method, pattern, handler)."""
    from mmengine.server import kserve, metrics, sagemaker

    return [*kserve.ROUTES, *sagemaker.ROUTES, *metrics.ROUTES]
