"""The SageMaker multi-model container contract's routes."""

ROUTES: list = []
