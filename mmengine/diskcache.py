"""The local disk cache of remote models: the tier between storage and a load.

Layout under `cache_dir`:

    <name>/<version>-<fingerprint>/   one complete model: every file of its
                                      [files] table (the artifact as
                                      <file>.zst when compressed) and a
                                      model.toml without `source`, which
                                      `storage.read_spec` reads as a local model
    .partial/                         downloads and removals in progress

A download fills a fresh directory under .partial/, each file verified
against its sha256 as it streams in, then the directory is renamed into
place: an entry that exists is complete (the rename is atomic), and
whatever a crash leaves is under .partial/, which the next start empties.
Nothing else in `cache_dir` is ever removed. The fingerprint hashes
everything the entry was made from (source, files and digests,
compression, the manifest it carries), so a changed stub makes a new
entry and the stale one goes.

Room is made before a download, for the spec's estimate, under both
limits: `disk_cache_bytes` of entries (0: none) and `disk_watermark` of
the capacity of the disk that holds the cache (psutil). Eviction takes the
least recently used entry first (used: `ensure`, `touch`; an entry's mtime
carries that order across restarts), never one being fetched or read by a
load: a download that would fit once those are done waits for them
(ROOM_WAIT_S at most), since a load lets go of its copy within seconds.

Thread-safe: one lock guards the index; downloads run outside it, one per
model at a time: a caller that finds a download of its model in flight
waits for that one's outcome (single flight).
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import psutil

from mmengine import fetch
from mmengine.config import Config, ConfigError
from mmengine.errors import LoadFailed
from mmengine.storage import MANIFEST, ZSTD_SUFFIX, ModelSpec, is_valid_name, tree_bytes

PARTIAL = ".partial"
Key = tuple[str, int]
#: How long a download waits for room that copies in use (being fetched,
#: or read by a load) hold, before it is refused: as long as a fetch may
#: stall.
ROOM_WAIT_S = fetch.TIMEOUT_S


@dataclasses.dataclass
class _Entry:
    path: Path
    fingerprint: str
    nbytes: int
    estimate: int  # the model's, as its copy's manifest says (bytes)
    users: int = 0  # loads that were handed its path and have not released it


class _Flight:
    """One download; the callers that wait for it read its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.path: Path | None = None
        self.error: LoadFailed | None = None


class DiskCache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = Path(config.cache_dir)
        self._lock = threading.Lock()
        self._let_go = threading.Condition(self._lock)  # a copy in use is no longer
        self._entries: collections.OrderedDict[Key, _Entry] = collections.OrderedDict()
        self._flights: dict[Key, _Flight] = {}
        self._reserved = 0  # the estimates of downloads in flight
        self._trash: list[tuple[Path, int]] = []  # evicted entries, renamed, not deleted
        self._trash_bytes = 0  # theirs: still on the disk, no longer the cache's
        self.hits = self.fetches = self.evictions = self.failures = 0
        try:
            self._scan()
        except OSError as e:  # there, and unreadable: the operator's to mend
            raise ConfigError(f"cache_dir: {config.cache_dir!r} cannot be read "
                              f"({e.strerror or e})") from None

    # -- the engine's face ---------------------------------------------------------

    def cached(self, spec: ModelSpec) -> Path | None:
        """The directory of `spec`'s cached copy, in use until `release`;
        None if it must be fetched; LoadFailed if its source is not allowed
        (any more). Quick: for the event loop."""
        fetch.check_source(spec.source, self.config, f"{spec.name} v{spec.version}")
        key, fp = (spec.name, spec.version), fingerprint(spec)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and _made_from(entry, spec, fp) and entry.path.is_dir():
                self._touch(key)
                self.hits += 1
                entry.users += 1
                return entry.path
        return None

    def estimate(self, name: str, version: int) -> int:
        """The bytes a cached model is estimated to take loaded: its stub's
        `bytes`, else its files' sizes as the source said them when it was
        fetched (0: not cached). A spec without `bytes` has 0 until then."""
        with self._lock:
            entry = self._entries.get((name, version))
            return 0 if entry is None else entry.estimate

    def release(self, name: str, version: int) -> None:
        """A load is done with the directory `ensure` or `cached` gave it:
        it may be evicted again."""
        with self._lock:
            entry = self._entries.get((name, version))
            if entry is not None and entry.users:
                entry.users -= 1
                self._let_go.notify_all()

    def ensure(self, spec: ModelSpec) -> Path:
        """The local directory that holds `spec`'s model, verified: its
        cached copy, or one fetched now; in use (never evicted) until
        `release`. Blocking: run it in an executor. LoadFailed if the model
        cannot be fetched (a source not allowed, unreachable, a digest that
        does not match, no room); nothing of a failed fetch stays on disk.
        A local spec is its own directory (and needs no release)."""
        if not spec.source:
            return spec.path
        where = f"{spec.name} v{spec.version}"
        hit = self.cached(spec)  # checks that the source is allowed
        if hit is not None:
            return hit
        key, fp = (spec.name, spec.version), fingerprint(spec)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()  # the leader's fetch is bounded by its timeouts
            if flight.error is not None:
                raise LoadFailed(str(flight.error))
            with self._lock:
                self.hits += 1
                self._use(key)
            return flight.path
        try:
            flight.path = self._fetch(spec, key, fp, where)
            with self._lock:
                self._use(key)
            return flight.path
        except LoadFailed as e:
            flight.error = e
            raise
        except OSError as e:
            flight.error = LoadFailed(f"{where}: disk cache {str(self.root)!r}: {e}")
            raise flight.error from e
        except BaseException as e:
            flight.error = LoadFailed(f"{where}: fetch failed: {type(e).__name__}: {e}")
            raise
        finally:
            with self._lock:
                del self._flights[key]
                self.failures += flight.error is not None
                self._let_go.notify_all()
            flight.done.set()

    def has(self, name: str, version: int) -> bool:
        """Whether a copy of (name, version) is cached (whatever its stub says now)."""
        with self._lock:
            return (name, version) in self._entries

    def touch(self, name: str, version: int) -> None:
        """Marks the cached copy of (name, version) as just used."""
        with self._lock:
            if (name, version) in self._entries:
                self._touch((name, version))

    def evict(self, name: str, version: int) -> int:
        """Removes the cached copy of (name, version) unless it is being
        fetched or read by a load; the bytes it held (0: none removed)."""
        with self._lock:
            key = (name, version)
            if key not in self._entries or key in self._flights or self._entries[key].users:
                return 0
            freed = self._evict(key)
        self._empty_trash()
        return freed

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"bytes": self._bytes(), "models": len(self._entries), "hits": self.hits,
                    "fetches": self.fetches, "evictions": self.evictions,
                    "failures": self.failures}

    # -- fetching --------------------------------------------------------------------

    def _fetch(self, spec: ModelSpec, key: Key, fp: str, where: str) -> Path:
        # The files take what the source says they take (a stat or a HEAD
        # each), and the download is held to it: a stub's `bytes` are the
        # model's in memory, and a source that said little could send more,
        # past the budget, beside other downloads that had counted on it.
        # A source that answers no HEAD is sized by the stub's `bytes`, and
        # its download may take the room there is.
        try:
            limit = self._source_bytes(spec, where)
        except LoadFailed:
            if not spec.estimated_bytes:
                raise
            limit = None
        estimate = spec.estimated_bytes or limit
        # The copy's manifest is written beside the files: its bytes count too.
        own = manifest(dataclasses.replace(spec, estimated_bytes=estimate)).encode()
        need = (spec.estimated_bytes if limit is None else limit) + len(own)
        self._make_root(where)
        try:
            with self._lock:
                if key in self._entries:  # a stale copy: the stub changed
                    self._evict(key)
                room = self._make_room(need, where)
                # One of no known size may take all the room there is: it
                # holds all of it, or two beside each other would overfill.
                if limit is None:
                    need = room
                self._reserved += need
        finally:
            self._empty_trash()
        final = self.root / spec.name / f"{spec.version}-{fp}"
        try:
            tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=self.root / PARTIAL))
            try:
                self._download(spec, tmp, room if limit is None else limit, where)
                _write_synced(tmp / MANIFEST, own)
                fetch.fsync_dir(tmp)  # every file was synced as it was renamed
                nbytes = tree_bytes(tmp)
                # Under the lock: an eviction of the model's other version
                # removes the name's directory once it is empty.
                with self._lock:
                    final.parent.mkdir(exist_ok=True)
                    os.rename(tmp, final)
                    self._entries[key] = _Entry(final, fp, nbytes, estimate)
                    self.fetches += 1
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            with self._lock:
                self._reserved -= need
                self._let_go.notify_all()
        fetch.fsync_dir(final.parent)
        return final

    def _source_bytes(self, spec: ModelSpec, where: str) -> int:
        """The sizes of a model's files as its source says them: a stat
        or an http HEAD each (a spec without `bytes` is sized only now)."""
        try:
            return sum(fetch.source_size(fetch.file_url(spec.source, file), self.config)
                       for file, _ in spec.files)
        except LoadFailed as e:
            raise LoadFailed(f"{where}: {e}") from e

    def _download(self, spec: ModelSpec, tmp: Path, limit: int, where: str) -> None:
        left = limit
        for file, digest in spec.files:
            dest = tmp / file
            dest.parent.mkdir(parents=True, exist_ok=True)
            compress = spec.compress == "zstd" and file == spec.artifact
            if compress:
                dest = dest.with_name(dest.name + ZSTD_SUFFIX)
            try:
                fetch.fetch_file(fetch.file_url(spec.source, file), dest, digest,
                                 self.config, left, compress)
            except LoadFailed as e:
                raise LoadFailed(f"{where}: {e}") from e
            left -= dest.stat().st_size

    # -- room ------------------------------------------------------------------------

    def _make_room(self, need: int, where: str) -> int:
        """Evicts least recently used entries until `need` more bytes fit
        under both limits; the room there then is. If that takes copies in
        use too (being fetched, or read by a load), waits for them to be let
        go, ROOM_WAIT_S at most. Holds the lock (the wait lets go of it)."""
        deadline = time.monotonic() + ROOM_WAIT_S
        while True:
            victims = [key for key, e in self._entries.items()
                       if key not in self._flights and not e.users]
            freeable = sum(self._entries[key].nbytes for key in victims)
            if self._room() + freeable >= need:
                break
            held = self._reserved + sum(e.nbytes for key, e in self._entries.items()
                                        if key in self._flights or e.users)
            left = deadline - time.monotonic()
            if not held or self._room() + freeable + held < need or left <= 0:
                victims = []  # evicting all would not do: evict none
                break
            self._let_go.wait(left)
        while True:
            room = self._room()
            if room >= need:
                return room
            if not victims:
                raise LoadFailed(
                    f"{where}: the disk cache has no room for {need} bytes "
                    f"({room} free under disk_cache_bytes={self.config.disk_cache_bytes} "
                    f"and disk_watermark={self.config.disk_watermark}; raise them, or "
                    f"set cache_dir to a larger disk)")
            self._evict(victims.pop(0))

    def _room(self) -> int:
        usage = psutil.disk_usage(str(self.root))
        # What was evicted is free as far as room goes: its files are
        # deleted once the lock is let go. And no more than is free: blocks
        # reserved for root (ext4's 5%) or another tenant of the device
        # count in neither `used` nor `free`.
        used = usage.used - self._trash_bytes
        room = min(int(self.config.disk_watermark * usage.total) - used,
                   usage.free + self._trash_bytes) - self._reserved
        if self.config.disk_cache_bytes:
            room = min(room, self.config.disk_cache_bytes - self._bytes() - self._reserved)
        return max(room, 0)

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _evict(self, key: Key) -> int:
        """Holds the lock. The entry is renamed away before it is removed,
        so a crash midway leaves no partial entry, only .partial/ debris."""
        entry = self._entries.pop(key)
        self.evictions += 1
        trash = self.root / PARTIAL / f"evicted-{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)  # made by downloads, which may not have run
        try:
            os.rename(entry.path, trash)
        except FileNotFoundError:
            return entry.nbytes
        self._trash.append((trash, entry.nbytes))  # removed by _empty_trash, out of the lock
        self._trash_bytes += entry.nbytes
        try:
            entry.path.parent.rmdir()  # the model's last version went
        except OSError:
            pass
        return entry.nbytes

    def _use(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.users += 1

    def _empty_trash(self) -> None:
        """Deletes evicted entries' files; after the lock is released, so
        that a large delete holds up no other caller."""
        with self._lock:
            trash, self._trash = self._trash, []
        for path, nbytes in trash:
            shutil.rmtree(path, ignore_errors=True)
            with self._lock:
                self._trash_bytes -= nbytes

    def _touch(self, key: Key) -> None:
        self._entries.move_to_end(key)
        try:
            os.utime(self._entries[key].path)  # the order survives a restart
        except OSError:
            pass

    # -- start -----------------------------------------------------------------------

    def _make_root(self, where: str) -> None:
        # Made by the first download, not at start: a server of local
        # models needs no cache (and may run where none can be written).
        try:
            (self.root / PARTIAL).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LoadFailed(f"{where}: cache_dir {str(self.root)!r} cannot be made "
                             f"({e.strerror or e}); set cache_dir to a writable "
                             f"directory") from None

    def _scan(self) -> None:
        """Empties .partial/ and indexes the complete entries, least
        recently used first."""
        shutil.rmtree(self.root / PARTIAL, ignore_errors=True)
        found: list[tuple[float, Key, _Entry]] = []
        for name_dir in _subdirs(self.root):
            if not is_valid_name(name_dir.name):
                continue
            for path in _subdirs(name_dir):
                version, _, fp = path.name.partition("-")
                estimate = _made_for(path / MANIFEST)
                if (version.isdigit() and str(int(version)) == version
                        and len(fp) == 16 and estimate is not None):
                    found.append((path.stat().st_mtime, (name_dir.name, int(version)),
                                  _Entry(path, fp, tree_bytes(path), estimate)))
        for _, key, entry in sorted(found, key=lambda f: f[0]):
            if key in self._entries:  # two copies of one model: the newer stays
                self._evict(key)
            self._entries[key] = entry
        self.evictions = 0


def _made_for(path: Path) -> int | None:
    """The `bytes` of a cached copy's manifest; None if it has none (not a
    copy of ours)."""
    try:
        made_for = tomllib.loads(path.read_text()).get("bytes")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return made_for if type(made_for) is int else None


def _made_from(entry: _Entry, spec: ModelSpec, fp: str) -> bool:
    """Whether `entry` is a copy of `spec` (whose fingerprint is `fp`).
    Copies made while a stub without `bytes` was sized as it was read
    (before mmengine-serve asked its source only when fetching) were
    fingerprinted with those sizes, which they carry as their estimate:
    they still serve."""
    return entry.fingerprint == fp or not spec.estimated_bytes and entry.fingerprint == \
        fingerprint(dataclasses.replace(spec, estimated_bytes=entry.estimate))


def fingerprint(spec: ModelSpec) -> str:
    """What a cached copy of `spec` was made from, hashed: a copy whose
    fingerprint differs is stale."""
    made_from = json.dumps([spec.source, spec.files, spec.compress, manifest(spec)])
    return hashlib.sha256(made_from.encode()).hexdigest()[:16]


# -- the cached copy's manifest ------------------------------------------------------

def manifest(spec: ModelSpec) -> str:
    """The model.toml of a cached copy: what `read_spec` reads there to get
    `spec` again, as a local model (no source)."""
    table: dict[str, Any] = {"backend": spec.backend, "bytes": spec.estimated_bytes,
                             "trusted": spec.trusted}
    if spec.device is not None:
        table["device"] = spec.device
    for key in ("inputs", "outputs"):
        tensors = getattr(spec, key)
        if tensors:
            table[key] = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
                          for t in tensors]
    if spec.warmup:
        table["warmup"] = {name: list(shape) for name, shape in spec.warmup}
    if spec.options:
        table["options"] = spec.options
    if spec.token_digests:
        table["token_sha256"] = [d.hex() for d in spec.token_digests]
    return "".join(f"{_toml_string(k)} = {_toml(v)}\n" for k, v in table.items())


def _toml(value: Any) -> str:
    # Inline forms only: every manifest value fits on one line that way.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # float reprs (1e-05, inf, nan) are TOML floats
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_toml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_string(k)} = {_toml(v)}"
                               for k, v in value.items()) + "}"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"no TOML form for {value!r}")


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's, but TOML also forbids a raw DEL.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


# -- files -------------------------------------------------------------------------

def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
