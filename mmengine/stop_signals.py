"""The signals that stop a server, and how its children are kept from them.

Its own module, importing nothing heavy: `mmengine serve` blocks them
before its imports start threads (numpy's), so that one sent while the
server starts reaches the thread that can undo the start (cli.main).
"""
from __future__ import annotations

import signal
import sys

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


#: A shell's status for a command that Ctrl-C ended (128 + SIGINT).
INTERRUPTED = 128 + signal.SIGINT
#: The modules `python -m` runs as the `mmengine` command (cli.main).
COMMANDS = ("mmengine", "mmengine.cli")


def quiet_interrupts() -> None:
    """In `python -m mmengine ...` whose package is being imported: until
    the command runs (cli.main, quiet_interrupts_end), Ctrl-C ends it with a
    line and INTERRUPTED, as a shell's command, not with a traceback of
    whatever Python was importing (KeyboardInterrupt). mmengine/__init__.py
    calls it first. Python says sys.argv[0] is "-m" while it finds the
    module; a program that imports the package keeps its Ctrl-C, and one
    that ignores Ctrl-C (a job in the background) ignores it still."""
    if sys.argv[:1] != ["-m"] or _module_run() not in COMMANDS:
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted)


def _module_run() -> str | None:
    """The module `python -m` runs: the word after the interpreter's -m
    (its options come before it, the module's arguments after)."""
    argv = getattr(sys, "orig_argv", [])
    return argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None


def _interrupted(_signum, _frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: a second cuts short no exit
    try:
        print("mmengine: interrupted", file=sys.stderr, flush=True)
    except OSError:  # no terminal left to say it on
        pass
    raise SystemExit(INTERRUPTED)


def quiet_interrupts_end() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the commands' own handling),
    where quiet_interrupts changed it."""
    if signal.getsignal(signal.SIGINT) is _interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
