"""Remote model storage: which sources may be read, and how one file is fetched.

A source is the URL of a model's directory: `http://host[:port]/dir/`,
`https://…/` or `file:///abs/dir/`. An http(s) source must name a host
listed in `allowed_hosts`; a file:// source, and every file read through
it (symlinks followed), must lie under `model_roots`. Everything else is
refused before a byte is read, with a message that names the key to set.

`fetch_file` streams one file to disk in large chunks, hashing (and,
when asked, zstd-compressing) on the way, into a temporary name beside
its destination; only a complete, verified and fsynced file is renamed
into place. A failure removes what it wrote.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import http.client
import os
import queue
import socket
import ssl
import stat
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from mmengine.errors import LoadFailed, MMEngineError

if TYPE_CHECKING:
    from mmengine.config import Config

#: Seconds a connection or one read may stall before the fetch fails.
TIMEOUT_S = 30.0
#: A download's pace (fetch_min_rate) is judged over windows this long.
FETCH_GRACE_S = 10.0
#: Bytes moved per read and write.
CHUNK = 4 << 20
SCHEMES = ("http", "https", "file")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# -- which sources may be read ---------------------------------------------------

def under_roots(path: str, model_roots: str, what: str,
                error: type[MMEngineError] = LoadFailed) -> str:
    """The real path of `path` if it lies under one of `model_roots`
    (separated by os.pathsep); `error` otherwise. Symlinks and `..` are
    resolved before the comparison, in the roots too, so no spelling of a
    path outside them gets in. `what` names the path in the message."""
    roots = [os.path.realpath(r) for r in model_roots.split(os.pathsep) if r]
    if not roots:
        raise error(f"no model roots are configured (model_roots, MMENGINE_MODEL_ROOTS): "
                    f"{what!r} may not be read")
    try:
        real = os.path.realpath(path)
    except ValueError:  # a NUL, which no path has
        raise error(f"{what!r} is not a path (it has a NUL character)") from None
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise error(f"{what!r} lies outside the allowed model roots "
                    f"(model_roots, MMENGINE_MODEL_ROOTS)")
    return real


@functools.lru_cache(maxsize=8)  # the config's one string, checked on every remote load
def parse_allowed_hosts(text: str) -> frozenset[tuple[str, int | None]]:
    """(host, port) pairs from "a.example, b.example:8443, [::1]:80"; a
    host without a port is allowed on any port. ValueError names a bad entry."""
    hosts = set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        parts = urlsplit("//" + entry)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if "*" in entry:  # a wildcard would match no host, silently
            raise ValueError(f"{entry!r}: no wildcards; name each host")
        if (not parts.hostname or port == -1 or parts.username is not None
                or parts.path or parts.query or parts.fragment):
            raise ValueError(f"{entry!r} is not a host or host:port")
        hosts.add((parts.hostname, port))
    return frozenset(hosts)


def check_url(url: str) -> None:
    """ValueError unless `url` is a well-formed source (a directory URL)."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{url!r}: a source must be an http://, https:// or file:// URL")
    if not parts.path.endswith("/") or parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a source names a directory: it ends with '/' and "
                         f"has no query or fragment")
    if not url.isascii() or not url.isprintable() or parts.username is not None:
        raise ValueError(f"{url!r}: a source is printable ASCII (percent-encode the "
                         f"rest) and carries no credentials")
    if parts.scheme == "file":
        try:
            path = unquote(parts.path, errors="strict")
        except UnicodeDecodeError:  # decoded with replacement, %E9 named a directory U+FFFD
            raise ValueError(f"{url!r}: a file:// source's %-escapes must be UTF-8") from None
        if "\0" in path:
            raise ValueError(f"{url!r}: a file:// source's path has a NUL character (%00)")
        if parts.netloc not in ("", "localhost") or not os.path.isabs(path):
            raise ValueError(f"{url!r}: a file:// source names a local absolute path "
                             f"(file:///...)")
    else:
        try:
            parts.port
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        if not parts.hostname:
            raise ValueError(f"{url!r}: an http(s) source names a host")


def check_source(url: str, config: Config, where: str = "") -> None:
    """LoadFailed, naming the key to set, unless `config` lets `url` be read."""
    prefix = f"{where}: " if where else ""
    parts = urlsplit(url)
    if parts.scheme == "file":
        try:
            under_roots(unquote(parts.path), config.model_roots, url)
        except LoadFailed as e:
            raise LoadFailed(prefix + str(e)) from None
        return
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    allowed = parse_allowed_hosts(config.allowed_hosts)
    if (parts.hostname, None) not in allowed and (parts.hostname, port) not in allowed:
        raise LoadFailed(f"{prefix}source host {parts.netloc!r} is not in allowed_hosts "
                         f"(set allowed_hosts, MMENGINE_ALLOWED_HOSTS, to fetch from it)")


def file_url(source: str, name: str) -> str:
    """The URL of file `name` (a relative path) of the model at `source`."""
    return source + quote(name)


# -- reading a source --------------------------------------------------------------

class Unsized(LoadFailed):
    """The source serves the file, but does not say its size (no
    Content-Length): unlike a source that is down, or that has no such
    file, its GET may still serve."""


def source_size(url: str, config: Config, timeout: float | None = None) -> int:
    """The size of the file at `url` without reading it (stat, or an http
    HEAD; where HEAD is refused, a GET of its first byte); Unsized if the
    source serves it but does not say its size, LoadFailed if the file is
    not allowed, missing or unreachable."""
    timeout = timeout or TIMEOUT_S
    try:
        stream, size = _open(url, config, timeout, "HEAD")
    except _NoHead:
        # 405 or 501, or 403: a URL signed for its GET alone (S3's presigned
        # URLs) is forbidden any other method. Its GET says whether it serves
        # (an expired URL refuses it too: then nothing is evicted for it).
        stream, size = _open(url, config, timeout, "GET", first_byte=True)
    stream.close()
    if size is None:
        raise Unsized(f"{url}: the server does not say its size (no Content-Length); "
                      f"declare bytes in model.toml")
    return size


class _NoHead(LoadFailed):
    """The source refused a HEAD (403, 405, 501): its GET may serve."""


def _open(url: str, config: Config, timeout: float, method: str = "GET",
          first_byte: bool = False) -> tuple[BinaryIO, int | None]:
    """A stream over the file at `url` and its size, if known; with
    `first_byte`, a GET of its first byte alone, for its size."""
    check_source(url, config)
    parts = urlsplit(url)
    if parts.scheme == "file":
        # Each file is checked, not only the directory: a symlink in an
        # allowed directory may point anywhere.
        real = under_roots(unquote(parts.path), config.model_roots, url)
        try:
            # Non-blocking: a FIFO's open would wait for a writer for ever.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise LoadFailed(f"{url}: cannot read: {e.strerror}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO, a device: no file of a model
            os.close(fd)
            raise LoadFailed(f"{url}: not a regular file")
        os.set_blocking(fd, True)
        return open(fd, "rb", buffering=0), st.st_size
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    # A read's timeout bounds each read alone: a source that sends its
    # headers a byte at a time would hold this thread for ever. The whole
    # exchange up to the headers gets `timeout`, its socket shut past it.
    cut = _Cutoff(conn, timeout)
    try:
        cut.arm()
        # Connection: close hands the socket to the response, which then
        # owns it and closes it with itself.
        headers = {"Accept-Encoding": "identity", "Connection": "close",
                   "User-Agent": "mmengine"}
        if first_byte:
            headers["Range"] = "bytes=0-0"
        conn.request(method, parts.path, headers=headers)
        response = conn.getresponse()
    except (OSError, ValueError, http.client.HTTPException) as e:
        conn.close()
        if cut.fired:
            raise LoadFailed(f"{url}: no response within {timeout:g} s") from e
        raise LoadFailed(f"{url}: {type(e).__name__}: {e}") from e
    finally:
        cut.disarm()
    if cut.fired:  # shut just as the headers came: the body cannot be read
        conn.close()
        raise LoadFailed(f"{url}: no response within {timeout:g} s")
    if response.status != 200 and not (first_byte and response.status == 206):
        conn.close()
        # A redirect could lead to a host that allowed_hosts does not name.
        why = " (redirects are not followed)" if 300 <= response.status < 400 else ""
        no_head = method == "HEAD" and response.status in (403, 405, 501)
        raise (_NoHead if no_head else LoadFailed)(
            f"{url}: HTTP {response.status} {response.reason}{why}")
    coding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if coding != "identity":  # asked for none: the bytes are not the file's
        conn.close()
        raise LoadFailed(f"{url}: the server sent Content-Encoding {coding!r} where "
                         f"identity was asked for")
    length = response.getheader("Content-Length")
    if response.status == 206:  # "bytes 0-0/SIZE": the whole file's, after the slash
        length = (response.getheader("Content-Range") or "").rpartition("/")[2]
    # ASCII digits alone: str.isdigit() takes "²", which int() refuses, and
    # int() refuses past 4,300 digits. Another length is no length.
    size = int(length) if length and length.isascii() and length.isdigit() \
        and len(length) <= 19 else None
    return response, size


class _Cutoff:
    """Shuts a connection down once `timeout` seconds pass after arm(),
    unless disarmed first: a read blocked on it then ends at once, a TLS
    handshake's too. It shuts a duplicate of the socket made as it
    connected, which it alone closes: the connection's own may be closed
    and its number reused meanwhile."""

    def __init__(self, conn: http.client.HTTPConnection, timeout: float) -> None:
        self.timeout = timeout
        self.fired = False
        self._dup: socket.socket | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        connect = conn._create_connection

        def connected(*args, **kwargs) -> socket.socket:
            sock = connect(*args, **kwargs)
            with self._lock:
                if self._timer is not None:
                    self._dup = sock.dup()
            return sock
        conn._create_connection = connected

    def arm(self) -> None:
        self._timer = threading.Timer(self.timeout, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._timer is None:
                return
            self.fired = True
            if self._dup is not None:  # (not yet connected: connect() has its own timeout)
                try:
                    self._dup.shutdown(socket.SHUT_RDWR)
                except OSError:  # the peer has gone already
                    pass

    def disarm(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._dup is not None:
                self._dup.close()
                self._dup = None


def fetch_file(url: str, dest: Path, digest: str, config: Config, limit: int,
               compress: bool = False, timeout: float | None = None,
               room: bool = False) -> int:
    """Fetches `url` to `dest` (its directory exists); returns the bytes read.

    `digest`: the hex sha256 the bytes must have ("": not checked).
    `limit`: the most bytes the file may hold. With `compress`, `dest` is
    written as one zstd frame (level 3) that records the content size,
    which a reader needs before it reads (storage.zstd_reader): from a
    source that does not say its size, the file lands whole first and is
    compressed from there, beside it; `room`: `limit` is the room there is
    on disk (not the file's size, as its source said it), which both must
    fit then. LoadFailed for every failure; `dest` then does not exist and
    no temporary file is left."""
    stream, size = _open(url, config, timeout or TIMEOUT_S)
    tmp = dest.with_name(f".{uuid.uuid4().hex}.part")
    raw = tmp.with_suffix(".raw") if compress and size is None else None
    if raw is not None and room:  # the copy is hardly larger than the file
        limit //= 2
    try:
        with stream:
            if size is not None and size > limit:
                raise LoadFailed(f"{url}: {size} bytes exceed the {limit} the disk cache "
                                 f"holds for it")
            with open(raw or tmp, "wb") as out:
                got = _copy(stream, out, size, limit, digest, compress and raw is None, url,
                            config.fetch_min_rate)
                if raw is None:
                    out.flush()
                    os.fsync(out.fileno())
        if raw is not None:
            with open(raw, "rb") as whole, open(tmp, "wb") as out:
                _compress(whole, out, got)
                out.flush()
                os.fsync(out.fileno())
        os.rename(tmp, dest)
        fsync_dir(dest.parent)
        return got
    except OSError as e:
        raise LoadFailed(f"{url}: {type(e).__name__}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
        if raw is not None:
            raw.unlink(missing_ok=True)


def _zstd_writer(out: BinaryIO, size: int):
    """One zstd frame that records its content size (`size` bytes) and a
    checksum, written into `out` as the bytes come."""
    import zstandard  # only a compressed fetch needs it
    return zstandard.ZstdCompressor(level=3, write_content_size=True,
                                    write_checksum=True).stream_writer(
        out, size=size, closefd=False)


def _compress(whole: BinaryIO, out: BinaryIO, size: int) -> None:
    import zstandard
    sink = _zstd_writer(out, size)
    buf = memoryview(bytearray(CHUNK))
    while n := whole.readinto(buf):
        sink.write(buf[:n])
    sink.flush(zstandard.FLUSH_FRAME)


def _copy(stream: BinaryIO, out: BinaryIO, size: int | None, limit: int, digest: str,
          compress: bool, url: str, min_rate: int) -> int:
    sha = hashlib.sha256()
    sink: BinaryIO = out
    if compress:
        sink = _zstd_writer(out, size)
    buf = memoryview(bytearray(CHUNK))
    # What has come, as it comes: a reader that waits for its buffer to fill
    # cannot see a source that trickles (nor say how far a stalled one got).
    # http.client's response reads once a call (readinto1: its read1); a
    # raw file is read with readinto, which fills as much as it can.
    read = getattr(stream, "readinto1", stream.readinto)
    # Judged a window at a time: an average since the first byte would let
    # a fast start carry a trickle for hours.
    window, window_got = time.monotonic(), 0
    got = 0
    while True:
        try:
            n = read(buf)
        except (OSError, http.client.HTTPException) as e:
            raise LoadFailed(f"{url}: read failed after {got} bytes: "
                             f"{type(e).__name__}: {e}") from e
        if not n:
            break
        got += n
        elapsed = time.monotonic() - window
        if min_rate and elapsed > FETCH_GRACE_S:
            if got - window_got < min_rate * elapsed:
                raise LoadFailed(f"{url}: {got - window_got} bytes in the last "
                                 f"{elapsed:.0f} s ({got} in all), slower than "
                                 f"fetch_min_rate ({min_rate} bytes/s)")
            window, window_got = time.monotonic(), got
        if got > limit:
            raise LoadFailed(f"{url}: more than the {limit} bytes the disk cache holds "
                             f"for it")
        sha.update(buf[:n])
        sink.write(buf[:n])
    if size is not None and got != size:
        raise LoadFailed(f"{url}: the connection ended after {got} of {size} bytes")
    if digest and sha.hexdigest() != digest:
        raise LoadFailed(f"{url}: sha256 {sha.hexdigest()} does not match the manifest's "
                         f"{digest}")
    if compress:
        import zstandard
        sink.flush(zstandard.FLUSH_FRAME)
    return got


class Threads(concurrent.futures.Executor):
    """Up to `max_workers` daemon threads to fetch on. A source that stalls
    holds a thread in a read for up to TIMEOUT_S, and the interpreter joins
    a ThreadPoolExecutor's threads as it exits: a stopping server would
    outlive its shutdown deadline by that much. A fetch cut off by the
    exit leaves its bytes under the disk cache's .partial/, which the next
    start empties."""

    def __init__(self, max_workers: int, name: str) -> None:
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._max = max_workers
        self._name = name
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._work.put((future, fn, args, kwargs))
            if len(self._threads) < self._max:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                self._threads.append(thread)
                thread.start()
        return future

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 - the future carries it
                future.set_exception(e)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._work.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._work.put(None)
        if wait:
            for thread in threads:
                thread.join()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
