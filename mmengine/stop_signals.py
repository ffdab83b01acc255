"""The signals that stop a server, and how its children are kept from them.

Its own module, importing nothing heavy: `mmengine serve` blocks them
before its imports start threads (numpy's), so that one sent while the
server starts reaches the thread that can undo the start (cli.main).
"""
from __future__ import annotations

import signal

# The signals that stop a server (its front-end's to handle): Ctrl-C,
# SIGTERM, and SIGHUP, a closed terminal or ssh session, which would kill
# a server at once, its requests cut off and its shared memory left.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignoring_stop_signals(code: str) -> str:
    """`code` for `python -c`, after lines that ignore the stop signals: a
    child of the server's (a worker, the demo's generator) is stopped by
    it, never by one sent to the whole process group. An ignored signal
    stays ignored in what the child execs; one the server blocked while it
    started the child (as the pool does) stays blocked: unblocked here,
    and dropped if it came meanwhile."""
    stop = sorted(int(s) for s in STOP_SIGNALS)
    return (f"import signal\nfor s in {stop}: signal.signal(s, signal.SIG_IGN)\n"
            f"signal.pthread_sigmask(signal.SIG_UNBLOCK, {stop})\n{code}")
