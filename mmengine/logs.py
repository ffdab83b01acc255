"""How mmengine's processes write their lines for operators: each with its
time (UTC, to the millisecond), its level and who said it, so that lines
from the front-end and from several workers interleaved in one stream (a
container's log) can be put in order and told apart."""
from __future__ import annotations

import logging
import sys
import time


class _Handler(logging.StreamHandler):
    """A line that cannot be written (its reader gone: a pipe whose reader
    ended, as under `| head`; a closed terminal) is dropped: a server goes
    on without its operator's lines, not with a "--- Logging error ---"
    traceback on stderr for each."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def handler(stream, who: str) -> logging.Handler:
    """A handler writing to `stream` as "<time> <LEVEL> <who>: <message>"."""
    out = _Handler(stream)
    formatter = logging.Formatter(f"%(asctime)s.%(msecs)03dZ %(levelname)s {who}: "
                                  "%(message)s", "%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    out.setFormatter(formatter)
    return out


def to(log: logging.Logger, stream, who: str, level: str = "info") -> None:
    """Sends `log`'s lines at `level` and above to `stream`, and nowhere else."""
    log.addHandler(handler(stream, who))
    log.setLevel(level.upper())
    log.propagate = False
