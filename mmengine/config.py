"""Configuration: one frozen object, and the only reader of MMENGINE_* variables.

A Config is filled from a TOML file, then MMENGINE_<KEY> environment
variables, then explicit overrides (CLI flags), and validated once; an error
names the bad key (an unknown key in the file is one; an MMENGINE_ variable
that names none is said on stderr, with the key it may have meant). The
same object is passed whole into every process.
"""
from __future__ import annotations

import dataclasses
import difflib
import fractions
import importlib
import math
import os
import re
import sys
import tomllib
from typing import Any, Mapping


#: Set to 1 to run the pure-Python twins of the native core (the test
#: oracle) instead of the Cython/C extensions, and every module's source.
PURE_PYTHON_VAR = "MMENGINE_PURE_PYTHON"
#: Set to 1 to run the source of the compiled modules (mmengine/_source.py)
#: with the native core: what profilers that read Python's frames need.
SOURCE_VAR = "MMENGINE_SOURCE"
ENV_PREFIX = "MMENGINE_"
#: The variables of that prefix that are no configuration key: setup.py's,
#: and MMENGINE_TEST_*, the tests' own.
OTHER_VARS = {PURE_PYTHON_VAR, SOURCE_VAR, "MMENGINE_BUILD_ONLY", "MMENGINE_BUILD_DEBUG"}
TEST_VAR_PREFIX = "MMENGINE_TEST_"
GiB = 1 << 30
KiB = 1 << 10
MiB = 1 << 20


def cache_home() -> str:
    """XDG's cache directory: $XDG_CACHE_HOME, or ~/.cache."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec ignores a relative value
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return base


def _default_cache_dir() -> str:
    return os.path.join(cache_home(), "mmengine", "models")


def pure_python() -> bool:
    return _switch(PURE_PYTHON_VAR)


def native(name: str):
    """mmengine._<name>, a module's hot steps in C (csrc/<name>.pyx); None
    where it is not built, or pure Python is asked for."""
    if pure_python():
        return None
    try:
        return importlib.import_module(f"mmengine._{name}")
    except ImportError:
        return None


def run_source() -> bool:
    return _switch(SOURCE_VAR) or pure_python()


def _switch(var: str) -> bool:
    # Read before any configuration exists: a value that is no boolean is on.
    return _BOOLS.get(os.environ.get(var, "").strip().lower(), True)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def check_paths(config: "Config") -> None:
    """ConfigError unless `repo` and each of `model_roots` name a
    directory this user can read: a Config may leave `repo` unset (tools
    that serve nothing), an engine may not. A root that is not there is a
    typo, or a volume not mounted: every model added under it would be
    refused, long after the start."""
    if not config.repo:
        raise ConfigError("repo: no model repository given (--repo DIR or --demo)")
    for key, path in [("repo", config.repo)] + [
            ("model_roots", root) for root in config.model_roots.split(os.pathsep) if root]:
        if not os.path.isdir(path):
            raise ConfigError(f"{key}: {path!r} is not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"{key}: {path!r} cannot be read by this user")


@dataclasses.dataclass(frozen=True)
class Config:
    # -- models and workers
    repo: str = ""                       # model repository root
    device: str = "auto"                 # auto (GPUs if any) | cpu | cuda
    workers: int = 2                     # CPU worker processes (GPU: one per GPU)
    threads_per_worker: int = 0          # torch threads per CPU worker; 0: (cores - 1) / workers
    # Threads that read one model file at once in each worker (the kernel's
    # copy out of the page cache runs on the reading thread, ~5.5 GB/s each
    # here); 0: half the worker's share of the cores while it serves, since
    # readers on every core stall inference (a small model's p99 during
    # loads on 2 cores: ~0.7 ms with one reader, 3-5 ms with two), and all
    # of its share once it has served nothing for 0.1 s; 1 to 4 either way.
    load_threads: int = 0
    # While a worker loads, does its serving thread keep spinning for
    # requests (spin_us) and the front-end keep polling its answers
    # (poll_us)? "auto": where the worker's share of the cores holds its
    # readers, the spinning thread and one core more; elsewhere they would
    # take the cores the load needs, and a request that comes wakes the
    # worker instead, unless the serving thread helps with the load (a CPU
    # worker's loads: resources.spins_during_loads). "on" | "off".
    spin_during_loads: str = "auto"
    # How long a worker's loader thread may hold the GIL while its serving
    # thread waits for it (sys.setswitchinterval in each worker), and the
    # front-end's threads while its loop waits. A load's Python runs under
    # the GIL: at CPython's 5 ms a small model's p99 during loads was ~6x its
    # idle p99. Once a load's reads took the GIL no more (session 37), that
    # p99 was 470-780 us at 500 and 360-400 at 50 on 2 cores, the loads as
    # fast, the front-end's requests beside scrapes no slower (beside.py).
    gil_switch_us: float = 50.0
    # -- memory
    device_budget: int = 0               # bytes of models per worker; 0: a GPU's total
                                         # memory, or half of resources.memory_for_models
                                         # split over CPU workers
    high_watermark: float = 0.80         # evict when usage would pass this fraction...
    low_watermark: float = 0.70          # ...down to this one
    host_memory_watermark: float = 0.80  # system memory fraction that forces eviction
    # Bytes of models kept in shared memory for every worker to map (the
    # host tier): evicted models are demoted there, and reload from there.
    # "auto" (-1): a quarter of resources.memory_for_models (the memory the server
    # may have, less its rings and processes); 0: none.
    host_tier_bytes: int = -1
    # Loads in flight at once (different models, different workers) may
    # move this many bytes together; a larger model loads alone. 0: no bound.
    load_bytes_in_flight: int = 4 * GiB
    idle_unload_s: float = 0.0           # unload models unused this long; 0: never
    policy: str = "lru"                  # lru | gdsf
    monitor_interval_s: float = 1.0      # how often resource readings are taken
    # How often the repository's directories are read again, for models and
    # versions added or removed while serving; 0: never.
    repo_scan_s: float = 5.0
    # -- deadlines
    request_timeout_s: float = 30.0      # default deadline of a request, load wait included
    load_timeout_s: float = 120.0        # one load, from when its worker begins it
    ready_timeout_s: float = 60.0        # a worker's start-up handshake
    shutdown_timeout_s: float = 10.0     # drain + stop, all workers together
    # A worker whose running inference is still unanswered this long past
    # its request's deadline is taken for stuck in the model's code (no
    # thread can be made to leave it) and restarted; 0: never.
    stuck_inference_s: float = 120.0
    # A model whose load failed is refused (LOAD_FAILED, at once) this long
    # before its load is tried again; each failure in a row doubles it, up
    # to the cap. 0: retry on the next request.
    load_failure_backoff_s: float = 5.0
    load_failure_backoff_max_s: float = 300.0
    # -- bounded queues: past them a request is OVERLOADED at once
    max_queue_per_model: int = 1024      # requests accepted and not yet answered, per model
    max_queue_per_worker: int = 4096     # requests sent to a worker and not yet answered
    # The model time, as the worker's recent calls of each model say, that
    # a worker's request ring may hold, counting what is left of the call
    # under way. Past it, inferences wait in the front-end, one queue per
    # model, and go to the ring in turns: a model's next call goes in as
    # its call under way nears its end, so a model flooded with requests
    # delays another on its worker by about the call under way, not by its
    # whole queue. A model not yet timed counts as all of it. 0: one queue,
    # in arrival order.
    worker_backlog_ms: float = 2.0
    # -- transport
    ring_bytes: int = 64 * MiB           # each ring between the front-end and a worker
    # A ring waiter (a worker waiting for requests) spins this long before it
    # parks. Long enough to span the gap between a client's requests: on a
    # virtual machine a parked process wakes slowly and then runs its first
    # request cold (a tiny model's SDK p50: 213-247 us at 50, 134-199 at 300).
    # It yields its core to anyone runnable after an eighth of it; where
    # other busy processes keep taking the core, it stops spinning for a
    # while (ring.BackOff; its front-end's polls and linger too): a
    # spinner is runnable but never woken, and waits for their time slices. 0 here
    # and in poll_us gives the cores back at once (a small model's p99
    # beside a process copying memory on 2 cores: 1.1-2x its idle p99 at
    # 0, 3-20x at the defaults, measured before the back-off).
    spin_us: float = 300.0
    # The front-end polls a worker's answers this long after its last
    # request instead of sleeping until woken (the loop still serves its
    # sockets in between; not while that worker loads), and turns this long
    # after answering a client (TCP, HTTP) that runs on another CPU, for its
    # next request (server/listener.py, linger); 0: always sleep.
    poll_us: float = 200.0
    # -- serving (the servers read these)
    host: str = "127.0.0.1"
    tcp_port: int = 8081
    http_port: int = 8080                # 0: any free port; -1: no HTTP server
    http_idle_timeout_s: float = 60.0    # an idle keep-alive connection is closed
    # A TCP connection with nothing in flight and no bytes for this long is
    # closed (a frame begun and never finished included).
    tcp_idle_timeout_s: float = 300.0
    max_connections: int = 1024          # per server (TCP, HTTP); past it refused at once
    # Bytes of large request bodies (1 MiB or more) all servers hold at once,
    # received or waiting for an answer; past it a connection waits unread.
    receive_bytes: int = 256 * MiB
    # While connections wait for that budget, a body holding some of it must
    # arrive at this many bytes a second or more (averaged, after its first
    # two seconds), or it is cut off (TCP: TIMEOUT; HTTP: 408); 0: any pace.
    receive_min_rate: int = 1 * MiB
    # Directories under which POST /models (SageMaker) may add a model,
    # separated by os.pathsep; empty: nothing may be added at run time.
    model_roots: str = ""
    # -- remote model storage (mmengine/fetch.py, mmengine/diskcache.py)
    # Where models fetched from a remote source are kept between loads and
    # restarts; default: $XDG_CACHE_HOME/mmengine/models (~/.cache/...).
    cache_dir: str = dataclasses.field(default_factory=_default_cache_dir)
    disk_cache_bytes: int = 0            # bytes of fetched models kept; 0: no byte limit
    disk_watermark: float = 0.80         # fetched models are evicted before the cache's
                                         # disk passes this fraction of its capacity
    # Hosts that http(s) sources may name, "host" (any port) or "host:port",
    # separated by commas; empty: no remote host. file:// sources must lie
    # under model_roots instead.
    allowed_hosts: str = ""
    # A download must arrive at this many bytes a second or more, over each
    # FETCH_GRACE_S (10 s) of it, or it fails: a source that trickles would
    # hold one of the few fetch threads, and every other remote model's
    # first load, for ever. 0: any pace (a read that stalls 30 s still fails).
    fetch_min_rate: int = 256 * KiB
    # The token that control operations (load, unload, pin, unpin; KServe
    # repository load/unload; SageMaker POST and DELETE /models) must carry;
    # empty: they are open to every client. The servers keep only its sha256
    # (mmengine/auth.py); repr=False keeps it out of logged configurations.
    control_token: str = dataclasses.field(default="", repr=False)
    # Hot models: "name" or "name:version", separated by commas. Loaded at
    # start and pinned (never evicted, loaded again when their worker
    # dies); the server is ready only once each has been resident. A name
    # without a version pins the version that is the default at start.
    pin_models: str = ""
    trace_file: str = ""                 # Chrome trace events of requests, loads, evictions
    # The operator's lines on stdout: "debug" adds one per eviction (with
    # what it made room for); "info" has restarts and failures.
    log_level: str = "info"
    # Each answer of a worker says how its serving thread spent the request:
    # its CPU time, its waits for a core, when it woke (profiling, and
    # benchmarks/load.py; about three microseconds a request).
    account_requests: bool = False

    @property
    def max_request_bytes(self) -> int:
        """The largest message a ring takes: its capacity (see ring.py), or
        the largest record a record's size field can say where that is less."""
        from mmengine.ring import LARGEST_RECORD, rounded_capacity  # ring.py reads this module
        return min(rounded_capacity(self.ring_bytes), LARGEST_RECORD)

    def replace(self, **changes: Any) -> "Config":
        return load(overrides={**dataclasses.asdict(self), **changes}, env={})

    def __post_init__(self) -> None:
        # Built directly (the embedded API) as from a file: the same forms
        # ("2GiB"), refused with the same messages naming the key.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            taken = _coerce(f.name, value)
            if taken is not value:
                object.__setattr__(self, f.name, taken)
        _validate(self)


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
#: Keys whose values are secrets: never in a message, a log, nor the
#: environment of a process that runs model code (a worker).
SECRET_KEYS = frozenset(name for name, f in _FIELDS.items() if not f.repr)
SECRET_VARS = frozenset(ENV_PREFIX + name.upper() for name in SECRET_KEYS)
#: Bounds on counts of processes and threads: past them a typo, not a plan.
MAX_WORKERS = 1024
MAX_THREADS = 4096
_SIZE_KEYS = {"device_budget", "ring_bytes", "host_tier_bytes", "disk_cache_bytes",
              "load_bytes_in_flight", "receive_bytes", "receive_min_rate", "fetch_min_rate"}
_AUTO_SIZE_KEYS = {"host_tier_bytes"}  # -1 or "auto": sized from the machine
# [0-9], not \d: that is a digit of any script ("٣GiB" was 3 GiB).
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
# K, M, G, T (with or without B) are powers of 1000; Ki, Mi, Gi, Ti of 1024.
_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "KI": 1 << 10, "KIB": 1 << 10, "M": 10**6,
          "MB": 10**6, "MI": 1 << 20, "MIB": 1 << 20, "G": 10**9, "GB": 10**9, "GI": 1 << 30,
          "GIB": 1 << 30, "T": 10**12, "TB": 10**12, "TI": 1 << 40, "TIB": 1 << 40}
# Keys that hold several values in one string, and their separator: a TOML
# list is taken too.
_LIST_KEYS = {"model_roots": os.pathsep, "allowed_hosts": ",", "pin_models": ","}
# How a boolean is written in a variable or a file (empty: a variable unset).
_BOOLS = {"1": True, "true": True, "yes": True, "on": True,
          "0": False, "false": False, "no": False, "off": False, "": False}
# Keys of "auto", "on" or "off", which take a boolean for on or off.
_SWITCH_KEYS = {"spin_during_loads"}
LOG_LEVELS = ("debug", "info", "warning", "error")


def _close_key(key: str) -> str | None:
    """The key that `key` most likely means: the shortest that it begins (a
    flag's name: pin for pin_models, idle_unload for idle_unload_s; worker
    for workers, not worker_backlog_ms), its plural's (pins), the key it
    ends, or its plural does (token, tokens for control_token), or one
    spelled alike."""
    stem = key.removesuffix("s")
    for close in ([k for k in _FIELDS if k.startswith(key)],
                  [k for k in _FIELDS if k.startswith(stem + "_")],
                  [k for k in _FIELDS if k.endswith(("_" + key, "_" + stem))],
                  difflib.get_close_matches(key, _FIELDS, 1)):
        if close:
            return min(close, key=len)
    return None


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from 1048576, "1MiB", "1.5 GB" and the like (a fraction of a
    byte is dropped; a size under one byte that is not 0 is refused, so
    that "0.5" does not become 0, which some keys read as "auto")."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # TOML's 1e9; and -1.0 as -1, as an int key takes 2.0 (the caller judges the sign).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"{key}: {value!r} is not a size (e.g. 2GiB, 512MB, 1048576)")
    exact = fractions.Fraction(m.group(1)) * _UNITS[(m.group(2) or "").upper()]  # no float's inf
    if 0 < exact < 1:
        raise ConfigError(f"{key}: {value!r} is less than a byte")
    return int(exact)


def _plain(text: str) -> None:
    """ValueError unless `text` is a number in ASCII, without underscores:
    int() and float() take Python's spellings too ("1_0" as 10, "٣" as 3)."""
    if not text.isascii() or "_" in text:
        raise ValueError(f"not a plain number: {text!r}")


def integer(text: str) -> int:
    """An int as the flags write one (argparse's type): as a string in the
    file or a variable is read."""
    _plain(text)
    return int(text)


def number(text: str) -> float:
    """A float as the flags write one (argparse's type), as `integer`."""
    _plain(text)
    return float(text)


def _coerce(key: str, value: Any) -> Any:
    kind = _FIELDS[key].type
    try:
        # A number, -1.0 as well, is parse_size's.
        if key in _AUTO_SIZE_KEYS and isinstance(value, str) and \
                value.strip().lower() in ("auto", "-1"):
            return -1
        if key in _SIZE_KEYS:
            return parse_size(value, key)
        if kind in ("int", "float") and isinstance(value, str):
            _plain(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            return _BOOLS[str(value).strip().lower()]
        if key in _SWITCH_KEYS:
            text = str(value).strip().lower()
            if isinstance(value, bool) or (text not in ("auto", "") and text in _BOOLS):
                return "on" if _BOOLS[text] else "off"
            return text
        if key in _LIST_KEYS and isinstance(value, list) and \
                all(isinstance(v, str) for v in value):
            return _LIST_KEYS[key].join(value)
        if not isinstance(value, str):
            raise ValueError  # a list or a table where a string belongs
        if key == "host" and value.startswith("[") and value.endswith("]"):
            return value[1:-1]  # [::1], as a URL writes it: the address
        if key == "log_level":
            return value.strip().lower()  # INFO, as logging writes it, too
        return value
    except ConfigError:
        raise  # parse_size's, which says what a size looks like
    except (TypeError, ValueError, KeyError, OverflowError):  # 10**400 is no float
        shown = "its value" if key in SECRET_KEYS else repr(value)
        raise ConfigError(f"{key}: {shown} is not a valid {kind}") from None


def _idna(host: str) -> bool:
    try:
        host.encode("idna")
    except UnicodeError:
        return False
    return True


def _validate(c: Config) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            shown = "its value" if key in SECRET_KEYS else repr(getattr(c, key))
            raise ConfigError(f"{key}: {shown} {why}")

    for key, field in _FIELDS.items():  # inf, as no deadline, reached timers and joins
        if field.type == "float":
            need(math.isfinite(getattr(c, key)), key, "must be a finite number")
    need(c.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
    # An empty host is every interface to asyncio, where a variable's empty
    # value is the default's 127.0.0.1: said, never taken by accident.
    need(c.host.strip() != "", "host", "must name an address (0.0.0.0: every interface)")
    # The loop looks a name up as IDNA, whose error (an empty label: 127.0.0..1)
    # is no OSError: it came after the workers had started, as a traceback.
    need(_idna(c.host), "host", "is no host name (an empty label, or one over 63 characters)")
    need(1 <= c.workers <= MAX_WORKERS, "workers", f"must be from 1 to {MAX_WORKERS}")
    need(0 <= c.threads_per_worker <= MAX_THREADS, "threads_per_worker",
         f"must be from 0 to {MAX_THREADS}")
    need(0 <= c.load_threads <= MAX_THREADS, "load_threads", f"must be from 0 to {MAX_THREADS}")
    for key in _SIZE_KEYS:  # what the byte accounting (int64) can hold
        need(getattr(c, key) < 1 << 62, key, "is larger than any machine (4 EiB)")
    need(c.device_budget >= 0, "device_budget", "must be >= 0")
    need(c.host_tier_bytes >= -1, "host_tier_bytes", "must be a size, 0 (off) or auto")
    need(c.load_bytes_in_flight >= 0, "load_bytes_in_flight", "must be >= 0")
    need(0 < c.high_watermark <= 1, "high_watermark", "must be in (0, 1]")
    need(0 < c.low_watermark <= c.high_watermark, "low_watermark",
         f"must be in (0, high_watermark], and high_watermark is {c.high_watermark!r}")
    need(0 < c.host_memory_watermark <= 1, "host_memory_watermark", "must be in (0, 1]")
    need(c.idle_unload_s >= 0, "idle_unload_s", "must be >= 0")
    need(c.repo_scan_s >= 0, "repo_scan_s", "must be >= 0")
    need(c.policy in ("lru", "gdsf"), "policy", "must be lru or gdsf")
    need(c.spin_during_loads in ("auto", "on", "off"), "spin_during_loads",
         "must be auto, on or off")
    need(c.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
    for key in ("monitor_interval_s", "request_timeout_s", "load_timeout_s",
                "ready_timeout_s", "shutdown_timeout_s"):
        need(getattr(c, key) > 0, key, "must be > 0")
    need(c.load_failure_backoff_s >= 0, "load_failure_backoff_s", "must be >= 0")
    need(c.stuck_inference_s >= 0, "stuck_inference_s", "must be >= 0")
    need(c.load_failure_backoff_max_s >= c.load_failure_backoff_s,
         "load_failure_backoff_max_s", f"must be >= load_failure_backoff_s, which is "
                                       f"{c.load_failure_backoff_s!r}")
    need(c.ring_bytes >= 1 << 16, "ring_bytes", "must be at least 64KiB")
    need(c.max_queue_per_model >= 1, "max_queue_per_model", "must be at least 1")
    need(c.max_queue_per_worker >= 1, "max_queue_per_worker", "must be at least 1")
    need(0 <= c.worker_backlog_ms <= 60_000, "worker_backlog_ms",
         "must be from 0 to 60000 (a minute)")
    need(0 <= c.spin_us <= 1e6, "spin_us", "must be from 0 to 1e6 (a second)")
    need(1 <= c.gil_switch_us <= 1e6, "gil_switch_us", "must be from 1 to 1e6 (a second)")
    need(0 <= c.poll_us <= 1e6, "poll_us", "must be from 0 to 1e6 (a second)")
    need(0 <= c.tcp_port < 65536, "tcp_port", "must be a port number (0: any free)")
    need(-1 <= c.http_port < 65536, "http_port",
         "must be a port number (0: any free, -1: none)")
    need(c.http_idle_timeout_s > 0, "http_idle_timeout_s", "must be > 0")
    need(c.tcp_idle_timeout_s > 0, "tcp_idle_timeout_s", "must be > 0")
    need(c.max_connections >= 1, "max_connections", "must be at least 1")
    need(c.receive_bytes >= 1 << 20, "receive_bytes", "must be at least 1MiB")
    need(c.receive_min_rate >= 0, "receive_min_rate", "must be >= 0 (0: any pace)")
    need(bool(c.cache_dir.strip()), "cache_dir", "must name a directory")
    need(c.control_token == c.control_token.strip(" \t\r\n"), "control_token",
         "has white space at an end (a newline from a file?): clients' tokens never would "
         "(HTTP strips spaces and tabs from headers)")
    need(not re.search("[\x00-\x08\x0a-\x1f\x7f]", c.control_token), "control_token",
         "has a control character, which no HTTP header can carry")
    need(c.disk_cache_bytes >= 0, "disk_cache_bytes", "must be >= 0")
    need(c.fetch_min_rate >= 0, "fetch_min_rate", "must be >= 0 (0: any pace)")
    need(0 < c.disk_watermark <= 1, "disk_watermark", "must be in (0, 1]")
    from mmengine import fetch  # here: ssl and http.client are a server's, not every import's

    try:
        fetch.parse_allowed_hosts(c.allowed_hosts)
    except ValueError as e:
        raise ConfigError(f"allowed_hosts: {e}") from None
    parse_pins(c.pin_models)


def parse_pins(text: str) -> tuple[tuple[str, int | None], ...]:
    """pin_models as (name, version or None) pairs, in their order."""
    pins: list[tuple[str, int | None]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, colon, version = item.rpartition(":")
        if not colon or not version.isdigit():  # a colon in a name, and no version
            name, version = item, None
        elif not (version.isascii() and str(int(version)) == version
                  and 0 < int(version) < 1 << 63):  # "01" is no version's directory
            raise ConfigError(f"pin_models: {item!r}: a version is a positive integer, "
                              f"with no leading zeros")
        pin = (name, None if version is None else int(version))
        if pin in pins:
            raise ConfigError(f"pin_models: {item!r} is named twice")
        pins.append(pin)
    return tuple(pins)


def load(file: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, Any] | None = None,
         defaults: Mapping[str, Any] | None = None, serving: bool = False,
         claimed: Mapping[str, str] | None = None) -> Config:
    """A validated Config: Config's defaults < `defaults` < TOML file <
    MMENGINE_* variables < overrides (None values in overrides are ignored;
    an empty variable is unset). A bad value's error says where it came
    from. `serving`: its paths are checked too (check_paths), as a server's.
    `claimed`: keys that the caller sets in `overrides` whatever the file
    and the variables say (--demo's repo), each with the message that
    refuses a value from either, which would otherwise go unsaid."""
    unknown = set(defaults or {}) - set(_FIELDS)
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown configuration key")
    values: dict[str, Any] = dict(defaults or {})
    origin: dict[str, str] = {}
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except (OSError, ValueError) as e:  # (not TOML, or not UTF-8: UnicodeDecodeError)
            raise ConfigError(f"config file {os.fspath(file)!r}: {e}") from None
        if "mmengine" in table:  # a [mmengine] table, or top-level keys: not both
            if not isinstance(table["mmengine"], dict):
                raise ConfigError(f"mmengine: must be a table ([mmengine]) in "
                                  f"{os.fspath(file)!r}")
            beside = sorted(set(table) - {"mmengine"})
            if beside:
                raise ConfigError(f"{beside[0]}: outside the [mmengine] table of "
                                  f"{os.fspath(file)!r}, which holds the keys")
            table = table["mmengine"]
        for key, value in table.items():
            if key not in _FIELDS:
                close = _close_key(key)
                hint = f" (did you mean {close}?)" if close else ""
                raise ConfigError(f"{key}: unknown key in {os.fspath(file)!r}{hint}")
            values[key] = value
            origin[key] = f"in {os.fspath(file)!r}"
    env = os.environ if env is None else env
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in OTHER_VARS \
                or name.startswith(TEST_VAR_PREFIX):
            continue
        suffix = name[len(ENV_PREFIX):]
        key = suffix.lower()
        # Its one spelling: MMENGINE_control_token taken as well was
        # no secret's name, and reached the workers' model code.
        if key in _FIELDS and suffix == key.upper():
            if value:
                values[key] = value
                origin[key] = f"from {name}"
        else:  # said, not refused: the environment may be another program's too
            close = _close_key(key)
            hint = f" (did you mean {ENV_PREFIX}{close.upper()}?)" if close else ""
            if key == "config":
                hint = " (a configuration file is named with --config only)"
            print(f"mmengine: {name} is no configuration key; ignored{hint}", file=sys.stderr)
    for key, why in (claimed or {}).items():
        if key in origin:  # overridden, it went without a word
            raise ConfigError(f"{key}: {why} ({origin[key]})")
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise ConfigError(f"{key}: unknown configuration key")
        if value is not None:
            values[key] = value
            origin.pop(key, None)  # a flag, or the embedding program's own value
    try:
        config = Config(**values)  # taken and checked as it is made
        if serving:
            check_paths(config)
        return config
    except ConfigError as e:
        # Every message begins with its key; a check across keys names the
        # others after it, and each may have come from somewhere else.
        key, _, rest = str(e).partition(":")
        rest = re.sub(r"'[^']*'", "", rest)  # a value quoted ('/data/repo') names no key
        named = [key] + [k for k in origin if k != key and re.search(rf"\b{k}\b", rest)]
        said = [k for k in named if k in origin]
        if not said:
            raise
        if said == [key]:
            raise ConfigError(f"{e} ({origin[key]})") from None
        where = "; ".join(f"{k} {origin[k]}" for k in said)
        raise ConfigError(f"{e} ({where})") from None
