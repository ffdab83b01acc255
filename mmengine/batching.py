"""Requests joined into one call of their model, and its answer split back.

A model whose manifest sets `max_batch_size` above 1 takes requests joined
along their tensors' first dimension (their rows): where several of its
requests are queued together, its worker runs them as one call and
answers each its own rows. Nothing waits for a batch to fill; only what is
already queued is joined, so a lone request runs as it would alone.

Requests join when they could have been one request: the same input
names, each input's dtype and its shape past the first dimension alike,
and within each request one number of rows for all its inputs.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mmengine.errors import InternalError

Arrays = Mapping[str, np.ndarray]


def form(inputs: Arrays) -> tuple[int, dict] | None:
    """(rows, what another request must match to join) of one request's
    inputs; None for inputs that cannot join any: no inputs, a 0-d one, or
    inputs that disagree on their rows."""
    rows, kinds = -1, {}
    for name, a in inputs.items():
        shape = a.shape
        if not shape or rows not in (-1, shape[0]):
            return None
        rows = shape[0]
        kinds[name] = (a.dtype, shape[1:])
    return (rows, kinds) if kinds else None


def join(inputs: list[Arrays]) -> dict[str, np.ndarray]:
    """The requests' inputs as one, in order; they have the same form."""
    return {name: np.concatenate([one[name] for one in inputs]) for name in inputs[0]}


def split(outputs: Mapping[str, np.ndarray], rows: list[int], model: str) -> list[dict]:
    """Each request's rows of a joined call's `outputs`, as views. An
    output that does not have a row for each row of the inputs cannot be
    split: the model answered the batch as a whole, an INTERNAL error (its
    manifest promised otherwise)."""
    total = sum(rows)
    for name, a in outputs.items():
        if not a.shape or a.shape[0] != total:
            raise InternalError(
                f"{model}: output {name!r} has shape {list(a.shape)}, not a row for each of "
                f"the {total} rows of {len(rows)} joined requests (max_batch_size joins "
                f"requests along the first dimension; set it to 0 for a model that does "
                f"not answer row by row)")
    answers, start = [], 0
    for n in rows:
        answers.append({name: a[start:start + n] for name, a in outputs.items()})
        start += n
    return answers
