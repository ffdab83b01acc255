"""`mmengine serve | bench | stats | token`: the command line.

    mmengine serve --demo                 # a generated repository of demo models
    mmengine serve --repo DIR [--tcp-port 8081] [--workers N] [--device-budget 2GiB]
    mmengine serve --demo --trace serve.json   # Chrome trace events (open in Perfetto)
    mmengine stats [--url 127.0.0.1:8081] [--token T]
    mmengine bench [--url ...] [--models N] [--zipf S] [--requests M] [--concurrency C]
    mmengine token                        # a new token, and its line for a model.toml

Every serve option but --config and --demo is also a key of the TOML file
given with --config and an MMENGINE_<KEY> environment variable (--idle-unload,
--trace and --pin are idle_unload_s, trace_file and pin_models); flags win
over both. Bad values are
refused at start with a message that names the key.

`--token T` of stats and bench is sent with every request (a model whose
manifest lists tokens needs one). `--token -` reads it from the first line
of stdin instead, since a command line is visible to every user of the
machine (ps). The client commands read no environment variable: the
configuration module is the only reader of MMENGINE_* and it configures
the server, not its clients.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import functools
import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mmengine import config as cfg
from mmengine import heap, logs
from mmengine.stop_signals import STOP_SIGNALS, ignoring_stop_signals, quiet_interrupts_end

DEMO_MODELS = 64
DEMO_VERSION = 1  # bump when the demo repository's contents change
#: After the shutdown deadline, how long the typed answers of the requests it
#: cut off may take to reach clients that read them.
FLUSH_AFTER_STOP_S = 1.0
STATS_PAGE = 500  # models per `stats` call of `mmengine stats`
log = logging.getLogger("mmengine")


def demo_root() -> Path:
    return Path(cfg.cache_home()) / "mmengine" / f"demo-v{DEMO_VERSION}"


def ensure_demo_repository(root: Path) -> Path:
    """Generates the demo repository once; later calls reuse it. Generated in
    a child process so that the server itself never imports torch."""
    done = root / ".complete"
    if not done.exists():
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            probe = root.parent / f".probe{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as e:  # HOME unset or read-only, as in a container
            raise cfg.ConfigError(f"repo: --demo writes its models under {root.parent}, "
                                  f"which it cannot ({e.strerror or e}): point "
                                  f"XDG_CACHE_HOME at a writable directory") from None
        _remove_stale_demos(root)
        print(f"mmengine: generating {DEMO_MODELS} demo models in {root} (once)...",
              flush=True)
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        try:
            # The generator ignores the stop signals (a Ctrl-C reaches it
            # too): a stop signal raises _Stopped here (main), and run() kills
            # it on the way out; the kernel does if the server dies
            # (PR_SET_PDEATHSIG).
            generator = subprocess.run([sys.executable, "-c", ignoring_stop_signals(
                "import sys\n"
                "from mmengine.worker import _die_with_front_end; _die_with_front_end()\n"
                "from mmengine.demo import write_demo_repository\n"
                "write_demo_repository(sys.argv[1], int(sys.argv[2]))"),
                str(tmp), str(DEMO_MODELS)])
            if generator.returncode:  # a full disk, no torch: it printed why
                from mmengine.workers import exit_words

                raise cfg.ConfigError(f"repo: --demo could not generate its models in "
                                      f"{root.parent}: the generator ended with "
                                      f"{exit_words(generator.returncode)} (its error, "
                                      f"if it said one, is above)")
            (tmp / ".complete").write_text("ok\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if root.exists() and not done.exists():  # not one of ours (only whole ones come)
            shutil.rmtree(root, ignore_errors=True)  # (another first run may remove it too)
        try:
            tmp.rename(root)
        except OSError:
            if not done.exists():
                raise
        if tmp.exists():  # another server's first run was first: its copy is the one
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _remove_stale_demos(root: Path) -> None:
    """Removes what generators of servers that are gone left beside `root`
    (root.tmp<pid>: a server killed while it generated); one of our pid
    is a predecessor's too (pid 1 again in a container)."""
    for tmp in root.parent.glob(root.name + ".tmp*"):
        pid = tmp.name[len(root.name) + 4:]
        if not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # generating now
            except ProcessLookupError:
                pass
            except PermissionError:  # another user's, running
                continue
        shutil.rmtree(tmp, ignore_errors=True)


class _Stopped(BaseException):
    """A stop signal came before the server served: as KeyboardInterrupt,
    no `except Exception` on the way (a library's, around its own
    look-ups) may take it for its own failure and go on."""


def _raise_stopped(terminals: tuple[int, ...], signum, _frame) -> None:
    """Once: the stop signals are ignored from here, so that a second one
    cuts short no undoing on the way out."""
    _ignore_stop_signals()
    if signum == signal.SIGHUP:
        _quiet_closed_terminals(terminals)
    raise _Stopped(signal.Signals(signum).name)


def _raise_at_stop_signals() -> None:
    """From now a stop signal raises _Stopped (as Ctrl-C raises
    KeyboardInterrupt), so that what runs is undone on the way out; SIGHUP
    stays ignored under nohup. The loop's handlers replace these (_serve).
    Then unblocked (main blocked them): one that came meanwhile raises
    here."""
    handler = functools.partial(_raise_stopped, _terminals())
    for sig in STOP_SIGNALS:
        if not (sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN):
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _ignore_stop_signals() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _serve_config(args: argparse.Namespace) -> cfg.Config:
    overrides = {"repo": args.repo, "host": args.host, "tcp_port": args.tcp_port,
                 "http_port": args.http_port,
                 "workers": args.workers, "device_budget": args.device_budget,
                 "idle_unload_s": args.idle_unload, "trace_file": args.trace,
                 "log_level": args.log_level,
                 "pin_models": ",".join(args.pin) if args.pin else None}
    if not args.demo:
        return cfg.load(args.config, overrides=overrides, serving=True)
    if args.repo is not None:
        raise cfg.ConfigError("repo: --demo serves the demo repository; drop --repo, "
                              "or --demo to serve it")
    overrides["repo"] = str(demo_root())
    # A budget that holds a fraction of the demo models, so that traffic
    # over all of them loads and evicts (unless the file, a variable or a
    # flag says otherwise).
    defaults = {"device_budget": "4MiB"}
    claimed = {"repo": "--demo serves the demo repository; drop repo, or --demo to serve it"}
    # Its paths checked once the repository is there; the rest refused
    # before it is generated (once, seconds).
    config = cfg.load(args.config, overrides=overrides, defaults=defaults, claimed=claimed)
    ensure_demo_repository(demo_root())
    cfg.check_paths(config)
    return config


def _size(nbytes: int) -> str:
    """Bytes as an operator reads them: 96 KiB, 11.51 GiB (not "0 MiB")."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.4g} {unit}"
    return f"{nbytes} bytes"


def _say(text: str) -> None:
    """An operator line on stdout, as long as it can be written: a reader
    gone (a closed terminal, a pipe whose reader ended) stops no server."""
    try:
        print(text, flush=True)
    except OSError:
        pass


def _hung_up(stop: asyncio.Event, terminals: tuple[int, ...]) -> None:
    """SIGHUP: the server stops as on SIGTERM (_quiet_closed_terminals)."""
    _quiet_closed_terminals(terminals)
    stop.set()


def _terminals() -> tuple[int, ...]:
    """Which of stdout and stderr are on a terminal now."""
    return tuple(fd for fd in (1, 2) if os.isatty(fd))


def _quiet_closed_terminals(terminals: tuple[int, ...]) -> None:
    """After a SIGHUP: if it was a closed terminal, the descriptors that
    were on it (`terminals`, at start) now fail every write (EIO; and are
    no terminal any more), the interpreter's last flush too, which would
    end the process with 120: they write to nothing from here on. (A
    terminal still open keeps them; a file or a pipe too.)"""
    for fd in terminals:
        if not os.isatty(fd):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


async def _say_when_warm(engine, t_start: float) -> None:
    await engine.warmed()
    _say(f"mmengine: pinned models resident {time.monotonic() - t_start:.1f} s after "
         f"start; ready")


async def _listen(server, host: str, port: int, key: str) -> int:
    """server.start(host, port), whose failure names the key to change."""
    try:
        return await server.start(host, port)
    except OSError as e:
        if isinstance(e, socket.gaierror) or not e.errno:  # the host's: said as such
            raise
        where = f"host {host}" if e.errno == errno.EADDRNOTAVAIL else f"{key} {port}"
        raise OSError(e.errno, f"{where}: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # a name
        return host.lower() == "localhost"
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


async def _started(engine, stop: asyncio.Event) -> bool:
    """Starts `engine`, unless `stop` is set first (its workers may take
    up to ready_timeout_s to come up): then the start is cancelled (its
    workers, with nothing to drain, are killed at once) and False is
    returned, with no port opened. A start that fails once a stop signal
    has come fails of no fault of the server's: it stops as asked."""
    starting = asyncio.ensure_future(engine.start())
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not stop.is_set():
        await starting  # its error, if any, is the server's
        return True
    _say("mmengine: shutting down")
    starting.cancel()
    await asyncio.wait((starting,))
    if not starting.cancelled():
        starting.exception()  # taken: a start the stop cut short failed of it, if it did
    await engine.stop()  # one that was done as the stop came (else nothing to do)
    return False


@contextlib.asynccontextmanager
async def _stopping(engine):
    """A started engine, stopped on the way out (as `async with Engine`)."""
    try:
        yield engine
    finally:
        await engine.stop()


async def _serve(config: cfg.Config, demo: bool, tracer=None) -> None:
    from mmengine.engine import Engine
    from mmengine.server import http_routes, metrics
    from mmengine.server.http import HttpServer
    from mmengine.server.tcp import TcpServer

    t_start = time.monotonic()
    # The loop shares the GIL with threads that format a scrape or read a
    # repository: it waits for them this long at most, not 5 ms.
    sys.setswitchinterval(config.gil_switch_us / 1e6)
    logs.to(log, sys.stdout, "mmengine", config.log_level)  # beside what serve prints
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:  # each as Ctrl-C
        if sig == signal.SIGHUP:
            if signal.getsignal(sig) is signal.SIG_IGN:  # nohup's: no terminal to close
                continue
            loop.add_signal_handler(sig, _hung_up, stop, _terminals())
        else:
            loop.add_signal_handler(sig, stop.set)
    engine = Engine(config)
    if not await _started(engine, stop):
        return
    async with _stopping(engine):
        metrics.attach(engine)  # counters from the start, not from the first scrape
        if tracer is not None:
            engine.observers.append(tracer)
        server = TcpServer(engine)
        port = await _listen(server, config.host, config.tcp_port, "tcp_port")
        http = None
        if config.http_port >= 0:
            http = HttpServer(engine, http_routes(), idle_timeout_s=config.http_idle_timeout_s)
            http_port = await _listen(http, config.host, config.http_port, "http_port")
        if tracer is not None:  # not before: a start that fails on a port in use leaves
            tracer.begin()      # alone the file of the server that has it
        if not config.control_token and not _loopback(config.host):
            log.warning("listening on %s with no control_token: anyone who reaches it may "
                        "load, unload and pin models (mmengine token prints one)", config.host)
        heap.settle(heap.FRONT_END_YOUNG)  # started: what exists now lives as long as it
        n = await loop.run_in_executor(None, _models_with_a_version, engine.repo)
        workers = len(engine.pool.workers)
        host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6, as URLs say
        _say(f"mmengine: serving {n} model{'s' * (n != 1)} from {config.repo} on "
             f"tcp://{host}:{port} with {workers} worker{'s' * (workers != 1)} "
             f"({_size(engine.cache.capacity(2, 0))} of models each)")
        if http is not None:
            _say(f"mmengine: HTTP (KServe v2, SageMaker, /metrics) on "
                 f"http://{host}:{http_port}")
        if demo:
            _say(_demo_usage(engine.repo, host, port))
        if tracer is not None:
            _say(f"mmengine: writing a trace to {tracer.path}")
        warming = engine.health()["warming"]
        if warming:
            _say(f"mmengine: loading {len(warming)} pinned model{'s' * (len(warming) > 1)}; "
                 f"ready once they are resident")
            said = asyncio.ensure_future(_say_when_warm(engine, t_start))
        await stop.wait()
        if warming:
            said.cancel()
        _say("mmengine: shutting down")
        engine.refuse_new()  # requests on open connections now get OVERLOADED
        # One deadline for the servers' drain and the engine's: what is
        # unanswered then fails, typed, and that answer is written before the
        # connections close.
        deadline = time.monotonic() + config.shutdown_timeout_s
        servers = [server, *([http] if http is not None else [])]
        await asyncio.gather(*(s.drain(deadline) for s in servers))
        await engine.stop(deadline)
        flushed = max(deadline, time.monotonic() + FLUSH_AFTER_STOP_S)
        await asyncio.gather(*(s.close(flushed) for s in servers))


def _models_with_a_version(repo) -> int:
    """How many of the repository's folders are models (a thread's work):
    a folder with no version directory serves nothing."""
    from mmengine.errors import LoadFailed

    try:
        return sum(1 for found in repo.scan().versions.values() if found)
    except LoadFailed:  # the root is gone meanwhile: what start() found
        return len(repo.names())


_DEMO_USAGE = """
Call it from Python with the SDK:

    import numpy as np
    from mmengine import Client
    with Client("{host}:{port}") as c:
        print(c.list()[:3])
        print(c.infer("{model}", {{"{input}": np.ones({shape}, np.{dtype})}}))

Try `mmengine stats --url {host}:{port}` and
`mmengine bench --url {host}:{port}`; stop with Ctrl-C.
"""


def _demo_usage(repo, host: str, port: int) -> str:
    """The usage text, with a call that fits the example model's input."""
    spec = repo.resolve(sorted(repo.names())[0])
    x = spec.inputs[0]
    shape = tuple(1 if d == -1 else d for d in x.shape)
    return _DEMO_USAGE.format(host=host, port=port, model=spec.name, input=x.name,
                              shape=shape, dtype=x.dtype)


def _print_stats(args: argparse.Namespace) -> None:
    from mmengine.client import Client

    rows: list[dict] = []
    with Client(args.url, timeout=args.timeout, token=args.token) as c:
        # A page at a time: the server encodes each answer at once on its
        # loop (2.6 ms at 3,000 models), and serves the others between pages.
        stats: dict = {"next": None}
        while True:
            stats = c.stats(after=stats["next"], limit=STATS_PAGE)
            rows += stats["models"]
            if stats.get("next") is None:  # the last page (or a server that does not page)
                break
    # "uses": since the model last loaded (stats' per-model hits); the
    # totals' hits count requests that found their model resident.
    # "queued": the model's requests not yet answered (by name: all versions).
    print(f"{'model':<24} {'ver':>3} {'state':<14} {'worker':>6} {'queued':>6} {'bytes':>12} "
          f"{'host bytes':>12} {'uses':>8} {'loads':>6} {'evicts':>6} {'fails':>5}")
    for r in rows:
        worker = "-" if r["worker"] is None else r["worker"]
        print(f"{r['name']:<24} {r['version']:>3} {r['state']:<14} {worker:>6} "
              f"{r.get('queued', 0):>6} {r['bytes']:>12,} {r.get('host_bytes', 0):>12,} "
              f"{r['hits']:>8} {r['loads']:>6} {r['evictions']:>6} {r['failures']:>5}")
    t, host = stats["totals"], stats.get("host_tier", {})
    on_cpu = host.get("cpu_worker_bytes", 0)  # copies CPU workers run on: in their budgets
    print(f"\n{t['resident_models']} resident ({t['resident_bytes']:,} bytes), "
          f"{host.get('models', 0)} in the host tier ({host.get('bytes', 0) + on_cpu:,} bytes, "
          f"{on_cpu:,} in copies that models resident on CPU workers run on; "
          f"{sum(r['state'] == 'in host memory' for r in rows)} not resident), "
          f"{t['hits']} hits, {t['loads']} loads ({t.get('loads_from_host', 0)} from the "
          f"host tier), {t['evictions']} evictions, {t['failures']} failed loads, "
          f"{t['worker_restarts']} worker restarts")
    for w in stats.get("workers", []):
        state = "up" if w["alive"] else "down"
        print(f"worker {w['index']} ({w['device']}, {state}, pid {w['pid']}): "
              f"{w['in_flight']} in flight ({w.get('waiting_turn', 0)} waiting a turn), "
              f"busy {w.get('busy', 0.0):.0%}, {w['used_bytes']:,} of "
              f"{w['budget_bytes']:,} bytes" + _backoffs(w.get("spin_backoffs") or {}))
    for srv in stats.get("servers", []):
        print(f"{srv['server']} server on port {srv['port']}: {srv['connections']} of "
              f"{srv['max_connections']} connections open, {srv['refused']} refused, "
              f"{srv['lingers']} lingers")
    for r in rows:  # what failed, and why: the state says so only during a back-off
        if r["failures"]:
            retry = r.get("retry_in_s", 0.0)
            print(f"{r['name']} v{r['version']}: {r['failures']} failed "
                  f"load{'s' * (r['failures'] > 1)}, the last: {r['last_error']}"
                  + (f" (tried again in {retry:g} s)" if r["state"] == "failed" else ""))


def _backoffs(counts: dict) -> str:
    """A worker's spin back-offs, where it had any: the sign of busy
    neighbours on its cores (docs/observability.md)."""
    if not any(counts.values()):
        return ""
    return (f"; its spins backed off beside busy processes {counts.get('worker', 0)} "
            f"times, the front-end's polls {counts.get('front_end', 0)}")


def _print_token() -> None:
    from mmengine import auth

    token, hex_digest = auth.new_token()
    # stdout holds just the two lines, so `mmengine token | head -1` is the token.
    print(token)
    print(f'token_sha256 = "{hex_digest}"')
    print("mmengine: the first line is the token for clients (SDK token=..., "
          "Authorization: Bearer ...; or the server's control_token); the second "
          "goes into a model's model.toml, above its first [table] (below one, it would "
          "be that table's key). The server keeps only the digest.",
          file=sys.stderr)


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", metavar="T",
                        help="token sent with every request; '-': read it from stdin")


def _resolve_token(args: argparse.Namespace) -> None:
    if getattr(args, "token", None) == "-":
        args.token = sys.stdin.readline().strip() or None


def _serve_command(args: argparse.Namespace) -> int:
    """`mmengine serve`; a stop signal before the loop's handlers exist
    raises _Stopped (_raise_at_stop_signals)."""
    import uvloop

    from mmengine import trace
    from mmengine.errors import MMEngineError
    tracer = config = None
    try:
        config = _serve_config(args)
        if config.trace_file:
            try:
                tracer = trace.Trace(config.trace_file, begin=False)  # _serve begins it
            except OSError as e:
                print(f"mmengine: configuration error: trace_file: {e}", file=sys.stderr)
                return 2
        uvloop.run(_serve(config, args.demo, tracer))
    except cfg.ConfigError as e:  # a bad key, or one the repository decides (a pinned model)
        print(f"mmengine: configuration error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a port in use, a full /dev/shm: one line, not a traceback
        where = f"host {config.host!r}: " \
            if isinstance(e, socket.gaierror) and config is not None else ""
        print(f"mmengine: cannot serve: {where}{e}", file=sys.stderr)
        return 1
    except MMEngineError as e:  # a worker that could not start: one line too
        print(f"mmengine: cannot serve: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        # Stopped, or never started: the loop's handlers are gone (the
        # defaults are back), and a signal repeated now, or during the
        # interpreter's teardown, would end the process with -15, not 0, and
        # the trace unclosed.
        _ignore_stop_signals()
        if tracer is not None:  # after the engine stopped: every event is in
            tracer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    # Blocked before the imports start threads (numpy's), which inherit the
    # mask: a stop signal reaches this thread alone, the one that undoes a
    # start, even while it blocks in a system call (open(2) of a FIFO)
    # that a signal taken by another thread would never interrupt. `serve`
    # unblocks it once its handlers are in; the other commands at once.
    unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    quiet_interrupts_end()  # blocked: serve's handlers take it, the others' KeyboardInterrupt
    try:
        return _main(argv, unblocked)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)


def _main(argv: list[str] | None, unblocked: set[signal.Signals]) -> int:
    ap = argparse.ArgumentParser(prog="mmengine", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="serve a model repository",
        description="Serve a model repository. Each option but --config and --demo sets "
                    "a key of the TOML file given with --config, also an MMENGINE_<KEY> "
                    "variable: the option's name, or --idle-unload: idle_unload_s, "
                    "--trace: trace_file, --pin: pin_models (README: the keys). Flags win "
                    "over both, variables over the file.")
    serve.add_argument("--repo", help="model repository: <repo>/<name>/<version>/")
    serve.add_argument("--demo", action="store_true",
                       help="serve a generated repository of demo models")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--tcp-port", type=cfg.integer,
                       help="binary protocol port (default 8081; 0: any free)")
    serve.add_argument("--http-port", type=cfg.integer,
                       help="HTTP port (default 8080; 0: any free; -1: no HTTP)")
    serve.add_argument("--workers", type=cfg.integer, help="CPU worker processes")
    serve.add_argument("--device-budget", help="bytes of models per worker, e.g. 2GiB")
    serve.add_argument("--idle-unload", type=cfg.number, metavar="S",
                       help="unload models unused for S seconds")
    serve.add_argument("--trace", metavar="FILE",
                       help="write Chrome trace events of requests, loads and evictions "
                            "to FILE (open it in ui.perfetto.dev)")
    serve.add_argument("--pin", action="append", metavar="NAME[:VERSION]",
                       help="a hot model: loaded at start, never evicted (repeat for more; "
                            "pin_models)")
    serve.add_argument("--log-level", choices=cfg.LOG_LEVELS, type=str.lower,
                       help="the operator's lines on stdout (default info; debug adds one "
                            "per eviction)")
    serve.add_argument("--config", help="TOML file of configuration keys")

    stats = sub.add_parser("stats", help="a running server's per-model table")
    stats.add_argument("--url", default="127.0.0.1:8081",
                       help="the server's TCP address, host:port (default 127.0.0.1:8081)")
    stats.add_argument("--timeout", type=cfg.number, default=10.0,
                       help="seconds to wait for the server's answer (default 10)")
    add_token_argument(stats)

    from mmengine import bench
    bench_parser = sub.add_parser("bench", help="Zipf traffic against a running server")
    bench.add_arguments(bench_parser)
    add_token_argument(bench_parser)
    token_help = "print a new token and the token_sha256 line for a model's model.toml"
    sub.add_parser("token", help=token_help, description=token_help + " (or the token "
                   "for the server's control_token, whose digest it keeps)")

    args = ap.parse_args(argv)
    if args.command == "serve":
        try:
            # Until the loop's handlers take over, a stop signal raises: one
            # during the imports and the start-up (~0.6 s) ended the process
            # by its default action (exit 143), or with a traceback (Ctrl-C).
            _raise_at_stop_signals()
            return _serve_command(args)
        except _Stopped:  # before the engine started: nothing of it is left
            _say("mmengine: shutting down")  # (its handler ignores the signals now)
            return 0
    signal.pthread_sigmask(signal.SIG_SETMASK, unblocked)  # Ctrl-C as ever (KeyboardInterrupt)
    _resolve_token(args)  # (serve has no --token: it reads the tokens' digests)
    if args.command == "stats":
        # Piped into head: stop quietly when the reader does, as ls does.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        from mmengine.errors import MMEngineError
        if not args.timeout > 0:  # a usage error (2), as bench's, not a server down (1)
            print("mmengine stats: --timeout must be > 0", file=sys.stderr)
            return 2
        try:
            _print_stats(args)
        except (OSError, ValueError, MMEngineError) as e:  # down, or a bad --url: as bench
            print(f"mmengine stats: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C while it waits: as a shell's, no traceback
            print("\nmmengine stats: interrupted", file=sys.stderr)
            return 130
        return 0
    if args.command == "token":
        _print_token()
        return 0
    return bench.run(args)


if __name__ == "__main__":
    sys.exit(main())
