"""The local disk cache of remote models: the tier between storage and a load.

Layout under `cache_dir`:

    <name>/<version>-<fingerprint>/   one complete model: every file of its
                                      [files] table (the artifact as
                                      <file>.zst when compressed) and a
                                      model.toml without `source`, which
                                      `storage.read_spec` reads as a local model
    .partial/<pid>-<id>/              one cache's downloads and removals in
                                      progress, flock'ed while it lives

A download fills a fresh directory under .partial/, each file verified
against its sha256 as it streams in, then the directory is renamed into
place: an entry that exists is complete (the rename is atomic), and
whatever a crash leaves is under .partial/, which the next start empties
of every folder no live cache holds. Nothing else in `cache_dir` is ever
removed. The fingerprint hashes what identifies the entry's files
(source, files and digests, the artifact compressed or not), so a stub
that changes them makes a new entry and the stale one goes; an edit of
the keys that only say how to serve the files (max_batch_size, bytes,
inputs, ...) keeps the entry, and a load takes those from the stub, not
from the copy's manifest (which says the stub as it was fetched).

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

Servers may share one `cache_dir` (two releases side by side during a
restart, or the default directory of one user's servers): a copy read by
a load holds a shared flock on its folder, which an eviction must take
exclusively (else the copy stays: another server reads it), and a copy
another server fetched is taken as it is found (adopted) rather than
fetched again. Each server's index is its own: `disk_cache_bytes` counts
the copies it found at start, fetched or adopted, until another server
removes them (an entry knows its folder's inode, so a later copy at the
same path is never taken for it); `disk_watermark` is the disk's.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import tomllib
import uuid
import weakref
from pathlib import Path
from typing import Any

import psutil

from mmengine import fetch
from mmengine.config import Config
from mmengine.errors import LoadFailed, Overloaded
from mmengine.storage import (MANIFEST, ZSTD_SUFFIX, ModelSpec, is_valid_name, is_version,
                              tree_bytes, zstd_reader)

log = logging.getLogger("mmengine")

PARTIAL = ".partial"
Key = tuple[str, int]
#: How long a download waits for room that copies in use (being fetched,
#: or read by a load) hold, before it is refused: as long as a fetch may
#: stall.
ROOM_WAIT_S = fetch.TIMEOUT_S
#: How often a download waiting for copies another server's loads read
#: looks again (its loads' release wakes nobody here).
OTHERS_POLL_S = 0.2
#: Tries of a shared lock on a copy that another server's brief exclusive
#: one blocks (0.5 ms apart: a probe or a rename takes microseconds).
HOLD_TRIES = 10


@dataclasses.dataclass
class _Entry:
    path: Path
    fingerprint: str
    nbytes: int
    estimate: int  # the model's, as its copy's manifest says (bytes)
    ident: tuple[int, int]  # its folder's (st_dev, st_ino): not another server's later copy
    users: int = 0  # loads that were handed its path and have not released it
    fd: int | None = None  # its folder's, flock'ed shared while it has users
    unmovable: bool = False  # its removal failed (not ours to move): never a victim
    # Its files checked against their digests by this cache: fetched here,
    # or found (at start, another server's) and read whole before its first
    # load. A copy found is trusted no further than its bytes.
    verified: bool = False
    damaged: str | None = None  # what of it did not match, where it could not go
    # Read whole again after a load of it failed, and found to match: the
    # next failure is its model's too, and no reason to read it again.
    rechecked: bool = False


class _Flight:
    """One download; the callers that wait for it read its outcome."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.path: Path | None = None
        self.error: LoadFailed | None = None
        self.fingerprint = ""  # of the spec it fetches


class DiskCache:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.root = Path(config.cache_dir)
        self._lock = threading.Lock()
        self._let_go = threading.Condition(self._lock)  # a copy in use is no longer
        self._entries: collections.OrderedDict[Key, _Entry] = collections.OrderedDict()
        self._flights: dict[Key, _Flight] = {}
        self._reserved = 0  # the estimates of downloads in flight
        self._downloads: dict[Path, int] = {}  # their folders, and the bytes each reserved
        self._trash: list[tuple[Path, int]] = []  # evicted entries, renamed, not deleted
        self._trash_bytes = 0  # theirs: still on the disk, no longer the cache's
        self._held: dict[Path, _Entry] = {}  # the copies in use (users), by folder
        self._own: Path | None = None  # this cache's folder under .partial/
        self._own_fd: int | None = None  # flock'ed exclusive while the cache lives
        self._closed = False
        _CACHES.add(self)
        self.hits = self.fetches = self.evictions = self.failures = 0
        self.damaged = 0  # copies found on disk whose files did not match their digests
        # Why cache_dir cannot be read, while it cannot: remote models fail
        # to load saying so, and it is read again at each of their loads.
        # Local models need none of it: a start of them does not stop here.
        self._unreadable: str | None = None
        try:
            self._scan()
        except OSError as e:  # there, and unreadable (its mode, a link loop): the operator's
            self._unreadable = _unreadable(self.root, e)
            log.warning("%s: remote models fail to load until it can be", self._unreadable)
        self._empty_trash()  # the older of two copies of a model: no download may follow

    # -- the engine's face ---------------------------------------------------------

    def cached(self, spec: ModelSpec) -> Path | None:
        """The directory of `spec`'s cached copy, in use until `release`;
        None if it must be fetched; LoadFailed if its source is not allowed
        (any more). Quick: for the event loop."""
        fetch.check_source(spec.source, self.config, f"{spec.name} v{spec.version}")
        if self._unreadable is not None:  # read again by ensure, in a thread
            return None
        key, fp = (spec.name, spec.version), fingerprint(spec)
        with self._lock:
            entry = self._current(spec, key, fp)
            if entry is None or not entry.verified:  # checked by ensure, in a thread
                return None
            if not self._hold(entry):  # removed by another server sharing cache_dir
                if self._entries.get(key) is entry:
                    del self._entries[key]
                return None
            self._touch(key)
            self.hits += 1
            return entry.path

    def estimate(self, name: str, version: int) -> int:
        """The bytes a cached model is estimated to take loaded: its stub's
        `bytes`, else its files' sizes as the source said them when it was
        fetched (0: not cached). A spec without `bytes` has 0 until then."""
        with self._lock:
            entry = self._entries.get((name, version))
            return 0 if entry is None else entry.estimate

    def release(self, path: Path) -> None:
        """A load is done with the directory `ensure` or `cached` gave it:
        it may be evicted again (and is removed now if it is stale)."""
        with self._lock:
            entry = self._held.get(path)
            if entry is None:
                return
            entry.users -= 1
            if entry.users:
                return
            del self._held[path]
            os.close(entry.fd)
            entry.fd = None
            if self._entries.get(_key_of(entry)) is not entry:  # evicted while read
                try:
                    self._remove(entry)
                except (LoadFailed, OSError):
                    pass  # no trash can be made: the next start finds it, stale
            self._let_go.notify_all()
            trash = bool(self._trash)
        if trash:  # deleted off the caller's thread: the engine's event loop
            threading.Thread(target=self._empty_trash, name="mmengine-trash",
                             daemon=True).start()

    def _forget_locks(self) -> None:
        """Closes every flock'ed fd, and the cache with them: at close(),
        and in a forked child, whose copies of them would hold the parent's
        locks for as long as it lives (a flock belongs to the open file,
        which they share). A closed cache hands out nothing."""
        for entry in self._held.values():
            os.close(entry.fd)
            entry.fd, entry.users = None, 0
        if self._own_fd is not None:
            os.close(self._own_fd)
        self._held, self._own, self._own_fd, self._closed = {}, None, None, True

    def close(self) -> None:
        """Lets go of every copy in use and of this cache's folder under
        .partial/ (a download still running there fails)."""
        with self._lock:
            own = self._own
            self._forget_locks()
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)

    def ensure(self, spec: ModelSpec) -> Path:
        """The local directory that holds `spec`'s model, verified: its
        cached copy, or one fetched now; in use (never evicted) until
        `release`. Blocking: run it in an executor. LoadFailed if the model
        cannot be fetched (a source not allowed, unreachable, a digest that
        does not match, no room), Overloaded if the room is held by copies
        other loads read; nothing of a failed fetch stays on disk.
        A local spec is its own directory (and needs no release)."""
        if not spec.source:
            return spec.path
        where = f"{spec.name} v{spec.version}"
        hit = self.cached(spec)  # checks that the source is allowed
        if hit is not None:
            return hit
        self._read_again(where)
        key, fp = (spec.name, spec.version), fingerprint(spec)
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
                flight.fingerprint = fp
        if not leader:
            flight.done.wait()  # the leader's fetch is bounded by its timeouts
            if flight.fingerprint != fp:  # a download for the stub as it was: this one next
                return self.ensure(spec)
            if flight.error is not None:  # LoadFailed, or Overloaded (room to come)
                raise type(flight.error)(str(flight.error))
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or entry.path != flight.path or not self._hold(entry):
                    raise LoadFailed(f"{where}: its copy was evicted as soon as it was "
                                     f"fetched; retry")
                self.hits += 1
            return flight.path
        try:  # held for this caller
            flight.path = self._checked(spec, key, fp, where) or self._fetch(spec, key, fp, where)
            return flight.path
        except (LoadFailed, Overloaded) as e:
            flight.error = e
            raise
        except OSError as e:
            flight.error = LoadFailed(f"{where}: disk cache {str(self.root)!r}: {e}")
            raise flight.error from e
        except BaseException as e:
            flight.error = LoadFailed(f"{where}: fetch failed: {type(e).__name__}: {e}")
            if isinstance(e, Exception):  # typed for its caller as for the followers
                raise flight.error from e
            raise
        finally:
            with self._lock:
                del self._flights[key]
                self.failures += flight.error is not None
                self._let_go.notify_all()
            flight.done.set()

    def _read_again(self, where: str) -> None:
        """Reads cache_dir again where it could not be read (at start, or
        at the last try): LoadFailed, naming it, while it still cannot."""
        if self._unreadable is None:
            return
        with self._lock:  # (its read holds up the others only until it is mended)
            if self._unreadable is not None:
                try:
                    self._scan()
                except OSError as e:
                    self._unreadable = _unreadable(self.root, e)
                    raise LoadFailed(f"{where}: {self._unreadable}; make it readable by the "
                                     f"server, or set cache_dir to another directory") from None
                self._unreadable = None
        self._empty_trash()

    def check_after_failed_load(self, spec: ModelSpec, path: Path) -> None:
        """A load of `spec` from its copy at `path` failed (the model's
        code, its warm-up, or the copy's bytes): the copy is removed, to
        be fetched anew by the next load, where it changed since it was
        made: its files no longer match their digests, or one of no digest
        was written since (or is gone). A copy that did not change stays,
        and its model is not fetched again: a file of no digest cannot be
        told whole, but fetched anew it would be the same bytes from the
        same source, failing the same way at each retry. Blocking: it
        reads the whole copy (once; the files of no digest are only
        looked at)."""
        key = (spec.name, spec.version)
        unchecked = [file for file, digest in spec.files if not digest]
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.path != path or entry.rechecked and not unchecked \
                    or not self._hold(entry):
                return  # gone meanwhile, another copy now, or read whole since it failed
        try:
            damaged = (None if entry.rechecked else _damaged(path, spec)) \
                or _written_since(path, spec, unchecked)
        finally:
            self.release(path)
        if damaged is None:
            entry.rechecked = True
            return
        with self._lock:
            if entry.damaged is None:  # (two checks: counted once)
                self.damaged += 1
            # Where it cannot go now, ensure tries again.
            entry.damaged, entry.verified = damaged, False
            if self._entries.get(key) is entry:
                self._evict(key)
        self._empty_trash()
        log.warning("%s v%s: its disk cache copy failed to load and is damaged (%s): its "
                    "next load fetches it anew", spec.name, spec.version, damaged)

    def has(self, name: str, version: int) -> bool:
        """Whether a copy of (name, version) is cached (whatever its stub says now)."""
        with self._lock:
            entry = self._entries.get((name, version))
            if entry is not None and not entry.users and not _there(entry):
                del self._entries[(name, version)]  # another server sharing cache_dir removed it
                return False
            return entry is not None

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
            self._prune()
            return {"bytes": self._bytes(), "models": len(self._entries), "hits": self.hits,
                    "fetches": self.fetches, "evictions": self.evictions,
                    "failures": self.failures, "damaged": self.damaged}

    # -- fetching --------------------------------------------------------------------

    def _checked(self, spec: ModelSpec, key: Key, fp: str, where: str,
                 held: _Entry | None = None) -> Path | None:
        """The copy of `spec` found on disk (at start, or another server's),
        held for the caller once its files match their digests; None where
        there is none to check (`held`: the copy, held already). A damaged
        copy is evicted, to be fetched anew; LoadFailed if it cannot go
        (another server reads it)."""
        entry = held
        if entry is None:
            with self._lock:
                entry = self._current(spec, key, fp)
                if entry is None or entry.verified or not self._hold(entry):
                    return None
        damaged = entry.damaged or (None if entry.verified else _damaged(entry.path, spec))
        if damaged is None:
            with self._lock:
                entry.verified = True
                self.hits += 1
            return entry.path
        self.release(entry.path)
        with self._lock:
            self.damaged += entry.damaged is None  # read once: not read again while it stays
            entry.damaged = damaged
            if self._entries.get(key) is entry:
                self._evict(key)
            gone = self._entries.get(key) is not entry
        self._empty_trash()
        if not gone:
            why = ("cannot be moved away (not ours to move: remove it)" if entry.unmovable
                   else "another server reads it; retry once that is done")
            raise LoadFailed(f"{where}: its disk cache copy is damaged ({damaged}) and {why}")
        log.warning("%s: its disk cache copy was damaged (%s): fetched anew", where, damaged)
        return None

    def _fetch(self, spec: ModelSpec, key: Key, fp: str, where: str) -> Path:
        # The files take what the source says they take (a stat or a HEAD
        # each), and the download is held to it: a stub's `bytes` are the
        # model's in memory, and a source that said little could send more,
        # past the budget, beside other downloads that had counted on it.
        # A source that answers no HEAD is sized by the stub's `bytes`, and
        # its download may take the room there is; one that is down (or
        # has no such file) fails here, before any copy is evicted for it.
        try:
            limit = self._source_bytes(spec, where)
        except fetch.Unsized:
            if not spec.estimated_bytes:
                raise
            limit = None
        estimate = spec.estimated_bytes or limit
        # The copy's manifest is written beside the files: its bytes count too.
        own = manifest(dataclasses.replace(spec, estimated_bytes=estimate)).encode()
        need = (spec.estimated_bytes if limit is None else limit) + len(own)
        unchecked = None
        try:
            with self._lock:
                # Made meanwhile (by another server sharing cache_dir) and
                # found by another load here: this one reads it as well,
                # checked first where this cache has not read it whole.
                found = self._current(spec, key, fp)
                if found is not None and self._hold(found):
                    if found.verified:
                        self.hits += 1
                        return found.path
                    unchecked = found
                else:
                    partial = self._partial(where)
                    stale = self._entries.get(key)
                    if stale is not None and stale is found:  # it could not be held: going
                        del self._entries[key]
                    elif stale is not None:  # the stub changed
                        self._evict(key)
                        # Read by another server's load: its to remove, not this one's.
                        self._entries.pop(key, None)
                    room = self._make_room(need, where)
                    # One of no known size may take all the room there is: it
                    # holds all of it, or two beside each other would overfill.
                    if limit is None:
                        need = room
                    self._reserved += need
        finally:
            self._empty_trash()
        if unchecked is not None:  # damaged, it is gone: fetched after all
            return self._checked(spec, key, fp, where, held=unchecked) \
                or self._fetch(spec, key, fp, where)
        final = _copy_path(self.root, key, fp)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix="fetch-", dir=partial))
            with self._lock:
                self._downloads[tmp] = need
            try:
                self._download(spec, tmp, room if limit is None else limit,
                               limit is not None, where)
                _write_synced(tmp / MANIFEST, own)
                fetch.fsync_dir(tmp)  # every file was synced as it was renamed
                entry = _Entry(final, fp, tree_bytes(tmp), estimate, _ident(os.stat(tmp)),
                               verified=True)  # as it streamed in
                with self._lock:
                    theirs = self._place(tmp, key, entry)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            with self._lock:
                self._reserved -= need
                self._downloads.pop(tmp, None)
                self._let_go.notify_all()
        if theirs is not None:  # another server's copy came first: read instead, checked
            shutil.rmtree(tmp, ignore_errors=True)
            return self._checked(spec, key, fp, where, held=theirs) \
                or self._fetch(spec, key, fp, where)
        try:
            fetch.fsync_dir(final.parent)
        except OSError:  # durability only: the copy is whole, and held for its caller
            pass
        return final

    def _place(self, tmp: Path, key: Key, entry: _Entry) -> _Entry | None:
        """Holds the lock. Puts a download in place as `entry`, or, where
        another server's copy came first, that copy; held for the caller
        either way. None if the download was placed, else theirs;
        LoadFailed if neither stays put (each went as soon as it came)."""
        if self._closed:
            raise LoadFailed(f"{key[0]} v{key[1]}: the disk cache is closed (the server is "
                             f"stopping)")
        for _ in range(3):
            if self._rename_into_place(tmp, key, entry):
                self.fetches += 1
                return None
            theirs = self._adopt(key, entry.fingerprint)
            if theirs is not None and self._hold(theirs):
                return theirs
            if theirs is None and _made_for(entry.path / MANIFEST) is None:
                self._clear_leftover(entry.path)
            # Theirs went as it came: the name may be free for this one now.
        raise LoadFailed(f"{key[0]} v{key[1]}: its copy in cache_dir kept being removed "
                         f"by another server sharing it as it was placed; retry")

    def _clear_leftover(self, path: Path) -> None:
        """Holds the lock. Moves away a folder at a copy's path that is no
        copy (no manifest: a removal cut short left it), unless a load of
        another server reads it."""
        try:
            leftover = _Entry(path, "", 0, 0, _ident(os.stat(path)))
        except OSError:
            return
        self._remove(leftover)

    def _rename_into_place(self, tmp: Path, key: Key, entry: _Entry) -> bool:
        """Holds the lock. Renames a download into place as `entry`, held
        for its caller (flock'ed from before the rename: no other server
        evicts it first); False if a copy is there already."""
        entry.fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(entry.fd, fcntl.LOCK_SH)  # nobody else knows of it: at once
        for _ in range(3):  # another server's eviction may remove the name's folder
            try:
                entry.path.parent.mkdir(exist_ok=True)
                os.rename(tmp, entry.path)
                break
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    os.close(entry.fd)
                    raise
                os.close(entry.fd)
                return False
        else:
            os.close(entry.fd)
            raise OSError(errno.ENOENT, "the model's folder kept going as it was made")
        if key not in self._entries:  # else a copy of the stub as it is now came meanwhile:
            self._entries[key] = entry  # this one serves its caller, then goes
            self._entries.move_to_end(key)
        entry.users = 1
        self._held[entry.path] = entry
        return True

    def _source_bytes(self, spec: ModelSpec, where: str) -> int:
        """The sizes of a model's files as its source says them: a stat
        or an http HEAD each (a spec without `bytes` is sized only now)."""
        try:
            return sum(fetch.source_size(fetch.file_url(spec.source, file), self.config)
                       for file, _ in spec.files)
        except LoadFailed as e:
            raise type(e)(f"{where}: {e}") from e

    def _download(self, spec: ModelSpec, tmp: Path, limit: int, sized: bool,
                  where: str) -> None:
        """Fetches `spec`'s files into `tmp`, `limit` bytes in all: the sum
        of their sizes as the source said them (`sized`), each file held to
        what the others left of it; else the room there is, which each file
        takes from on disk."""
        left = limit
        for file, digest in spec.files:
            name, compress = _stored(spec, file)
            dest = tmp / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                got = fetch.fetch_file(fetch.file_url(spec.source, file), dest, digest,
                                       self.config, left, compress, room=not sized)
            except LoadFailed as e:
                raise LoadFailed(f"{where}: {e}") from e
            # A compressed copy of bytes that do not compress is a little
            # larger than they: the source's size is the one that was said.
            left -= got if sized else dest.stat().st_size

    # -- room ------------------------------------------------------------------------

    def _make_room(self, need: int, where: str) -> int:
        """Evicts least recently used entries until `need` more bytes fit
        under both limits; the room there then is. If that takes copies in
        use too (being fetched, or read by a load), waits for them to be let
        go, ROOM_WAIT_S at most: then Overloaded (the room comes back);
        LoadFailed where it would not fit if they went. Holds the lock (the
        wait lets go of it)."""
        deadline = time.monotonic() + ROOM_WAIT_S
        self._prune()
        while True:
            victims, elsewhere = [], 0  # elsewhere: bytes other servers' loads read
            for key, e in self._entries.items():
                if key in self._flights or e.users or e.unmovable:
                    continue
                if _read_elsewhere(e):
                    elsewhere += e.nbytes
                else:
                    victims.append(key)
            freeable = sum(self._entries[key].nbytes for key in victims)
            left = deadline - time.monotonic()
            if self._room() + freeable >= need:
                for key in victims:
                    if self._room() >= need:
                        break
                    self._evict(key)
                room = self._room()
                if room >= need:
                    return room
            held = self._reserved + elsewhere + self._unindexed() + sum(
                e.nbytes for key, e in self._entries.items() if key in self._flights or e.users)
            if not held or self._room() + freeable + held < need:
                break  # evicting all would not do: evict none
            if left <= 0:  # the room is there once other loads let go of it
                raise Overloaded(
                    f"{where}: the disk cache has no room for {need} bytes now: {held} "
                    f"bytes of it are copies in use (being fetched, or read by loads); "
                    f"retry once they are let go")
            # Other servers' loads let go of their copies without a word to
            # this one: look again shortly, as for this one's own.
            self._let_go.wait(min(left, OTHERS_POLL_S) if elsewhere else left)
        room = max(self._room(), 0)
        raise LoadFailed(
            f"{where}: the disk cache has no room for {need} bytes "
            f"({room} free under disk_cache_bytes={self.config.disk_cache_bytes} "
            f"and disk_watermark={self.config.disk_watermark}; raise them, or "
            f"set cache_dir to a larger disk)")

    def _room(self) -> int:
        """The bytes that fit under both limits now; below 0 past them."""
        usage = psutil.disk_usage(str(self.root))
        # What was evicted is free as far as room goes: its files are
        # deleted once the lock is let go. And no more than is free: blocks
        # reserved for root (ext4's 5%) or another tenant of the device
        # count in neither `used` nor `free`.
        # A download in flight holds its whole reservation, of which what it
        # has written is in `used` already: counted once.
        written = sum(min(_written(tmp), need) for tmp, need in self._downloads.items())
        used = usage.used - self._trash_bytes - written
        room = min(int(self.config.disk_watermark * usage.total) - used,
                   usage.free + self._trash_bytes + written) - self._reserved
        if self.config.disk_cache_bytes:
            room = min(room, self.config.disk_cache_bytes - self._bytes() - self._reserved)
        # Below 0 where the disk is past its watermark already (another
        # tenant's files, a budget lowered under what is cached): evicting
        # all then may still not make the room, and _make_room must know.
        return room

    def _prune(self) -> None:
        """Holds the lock. Forgets the copies another server sharing
        cache_dir removed: their bytes are no longer anyone's."""
        for key, entry in list(self._entries.items()):
            if not entry.users and not _there(entry):
                del self._entries[key]

    def _bytes(self) -> int:
        """Holds the lock. The bytes of the copies on disk."""
        return sum(e.nbytes for e in self._entries.values()) + self._unindexed()

    def _unindexed(self) -> int:
        """Holds the lock. The bytes of copies taken out of the index while
        loads read them (a stale stub's): on disk until they are let go."""
        return sum(e.nbytes for e in self._held.values()
                   if self._entries.get(_key_of(e)) is not e)

    def _evict(self, key: Key) -> int:
        """Holds the lock. Takes the entry out of the index and removes its
        files; the bytes that frees. A copy a load here reads goes when it
        is let go; one that a load of another server sharing cache_dir
        reads stays, indexed (0 freed)."""
        entry = self._entries[key]
        if entry.users:
            del self._entries[key]  # release() removes it
            return 0
        freed = self._remove(entry)
        if freed is not None:
            del self._entries[key]
        return freed or 0

    def _remove(self, entry: _Entry) -> int | None:
        """Holds the lock. Renames a copy no load here reads away (into
        the trash, so that a crash midway leaves no partial entry, only
        .partial/ debris); the bytes that frees; None if a load of another
        server reads it."""
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # gone: another server sharing cache_dir evicted it
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if _ident(os.fstat(fd)) != entry.ident:  # another server's copy, made since
                return 0
            trash = self._partial(str(entry.path)) / f"evicted-{uuid.uuid4().hex}"
            try:
                os.rename(entry.path, trash)
            except FileNotFoundError:
                return 0
            except OSError:  # not ours to move (its folder's owner, a mount): it stays
                entry.unmovable = True
                return None
        finally:
            os.close(fd)
        self.evictions += 1
        self._trash.append((trash, entry.nbytes))  # removed by _empty_trash, out of the lock
        self._trash_bytes += entry.nbytes
        try:
            entry.path.parent.rmdir()  # the model's last version went
        except OSError:
            pass
        return entry.nbytes

    def _hold(self, entry: _Entry) -> bool:
        """Holds the lock. One more load reads `entry`; the first takes a
        shared flock on its folder, so that no server sharing cache_dir
        evicts it meanwhile. False if it is gone, or going, or the cache is
        closed (a lock taken then would be nobody's to let go)."""
        if self._closed:
            return False
        if entry.users:
            entry.users += 1
            return True
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            _lock_shared(fd)
            # Renamed away between the open and the flock? Another's since?
            there = _ident(os.fstat(fd)) == _ident(os.stat(entry.path)) == entry.ident
        except OSError:  # BlockingIOError: being evicted
            there = False
        if not there:
            os.close(fd)
            return False
        entry.fd, entry.users = fd, 1
        self._held[entry.path] = entry
        return True

    def _current(self, spec: ModelSpec, key: Key, fp: str) -> _Entry | None:
        """Holds the lock. The entry of `spec`'s copy: indexed, or adopted."""
        entry = self._entries.get(key)
        if entry is not None and _made_from(entry, spec, fp):
            return entry
        return self._adopt(key, fp)

    def _adopt(self, key: Key, fp: str) -> _Entry | None:
        """Holds the lock. The copy of `key` made from `fp` that another
        server sharing cache_dir fetched, indexed as if this one had (the
        stale copy it replaces is evicted); None if there is none."""
        path = _copy_path(self.root, key, fp)
        estimate = _made_for(path / MANIFEST)  # read last, as its rename made it whole
        if estimate is None:
            return None
        indexed = self._entries.get(key)
        if indexed is not None and indexed.path == path:
            if _there(indexed):
                return indexed
            del self._entries[key]  # that folder went; another took its place: not to remove
        entry = self._held.get(path)  # taken out of the index while a load read it
        if entry is None:
            try:
                entry = _Entry(path, fp, tree_bytes(path), estimate, _ident(os.stat(path)))
            except OSError:  # evicted as it was read
                return None
        if key in self._entries:
            self._evict(key)
        self._entries[key] = entry
        return entry

    def _partial(self, where: str) -> Path:
        """Holds the lock. This cache's own folder under .partial/, made at
        its first download or removal and flock'ed as long as the cache
        lives, so that a server starting beside it (on the same cache_dir)
        leaves what is in it alone."""
        if self._own is not None:
            return self._own
        if self._closed:
            raise LoadFailed(f"{where}: the disk cache is closed (the server is stopping)")
        base = self.root / PARTIAL
        # Never through a link: downloads, and the removal of what they
        # leave, would land where it points. (Looked at again once the
        # folder is made: it may have been put there meanwhile.)
        link = LoadFailed(f"{where}: cache_dir {str(self.root)!r}: its {PARTIAL} is a link; "
                          f"remove it (the cache makes a folder of its own)")
        if os.path.islink(base):
            raise link
        for _ in range(3):
            own = base / f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            try:
                own.mkdir(parents=True)
                fd = os.open(own, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError as e:
                raise LoadFailed(f"{where}: cache_dir {str(self.root)!r} cannot be made "
                                 f"({e.strerror or e}); set cache_dir to a writable "
                                 f"directory") from None
            if os.path.islink(base):
                os.close(fd)
                os.rmdir(own)
                raise link
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # a server starting found it unlocked, and removed it?
                if os.path.samestat(os.fstat(fd), os.stat(own)):
                    self._own, self._own_fd = own, fd
                    return own
            except FileNotFoundError:
                pass
            os.close(fd)
        raise LoadFailed(f"{where}: cache_dir {str(self.root)!r}: a folder of its "
                         f".partial/ kept going as it was made")

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

    def _scan(self) -> None:
        """Empties .partial/ of what no live cache holds (a crashed
        server's) and indexes the complete entries, least recently used
        first."""
        _remove_unheld(self.root / PARTIAL)
        found: list[tuple[float, Key, _Entry]] = []
        for name_dir in _subdirs(self.root):
            if not is_valid_name(name_dir.name):
                continue
            try:
                paths = _subdirs(name_dir)
            except OSError as e:  # another's (a root-owned lost+found): no copy of ours
                log.warning("cache_dir: %s cannot be read (%s): passed over", name_dir,
                            e.strerror or e)
                continue
            for path in paths:
                version, _, fp = path.name.partition("-")
                estimate = _made_for(path / MANIFEST)
                if is_version(version) and len(fp) == 16 and estimate is not None:
                    try:
                        st = path.stat()
                        entry = _Entry(path, fp, tree_bytes(path), estimate, _ident(st))
                    except (OSError, LoadFailed):  # evicted as it was read, by another
                        continue  # server; or a folder of it unreadable: not a copy
                    found.append((st.st_mtime, (name_dir.name, int(version)), entry))
        for _, key, entry in sorted(found, key=lambda f: f[0]):
            if key in self._entries:  # two copies of one model: the newer stays
                try:
                    self._evict(key)
                except LoadFailed:  # no trash can be made: both stay, the newer indexed
                    del self._entries[key]
            self._entries[key] = entry
        self.evictions = 0


_CACHES: "weakref.WeakSet[DiskCache]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_CACHES):
        cache._forget_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _unreadable(root: Path, e: OSError) -> str:
    return f"cache_dir {str(root)!r} cannot be read ({e.strerror or e})"


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _lock_shared(fd: int) -> None:
    """A shared flock on `fd`, past another server's brief exclusive one
    (an eviction's rename, or _read_elsewhere's probe: microseconds each);
    BlockingIOError if it is still held after a few milliseconds."""
    for _ in range(HOLD_TRIES - 1):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.0005)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _read_elsewhere(entry: _Entry) -> bool:
    """Whether a load of another server reads `entry` now: its folder's
    exclusive lock cannot be had (a probe: taken, and let go at once)."""
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False  # gone: _prune forgets it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _there(entry: _Entry) -> bool:
    """Whether the copy `entry` indexes is still the folder at its path."""
    try:
        return _ident(os.stat(entry.path)) == entry.ident
    except OSError:
        return False


def _copy_path(root: Path, key: Key, fp: str) -> Path:
    return root / key[0] / f"{key[1]}-{fp}"


def _key_of(entry: _Entry) -> Key:
    return entry.path.parent.name, int(entry.path.name.partition("-")[0])


def _remove_unheld(partial: Path) -> None:
    """Removes what is in .partial/ but a live cache's own folder (which
    it keeps flock'ed): a crashed server's downloads and removals. A link
    in its place goes, not what it points to."""
    if partial.is_symlink():
        _unlink(partial)
        return
    try:
        with os.scandir(partial) as entries:
            found = [Path(e.path) for e in entries]
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:  # not ours to read: its debris stays, and costs no start
        log.warning("cache_dir: %s cannot be read (%s): not emptied", partial,
                    e.strerror or e)
        return
    for path in found:
        if path.is_symlink() or not path.is_dir():  # no cache's: each holds a folder
            _unlink(path)
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live cache's
        else:  # held while it goes: one made just now waits, and sees it gone
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _unlink(path: Path) -> None:
    """Removes a stray file of .partial/, or says why it stays."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:  # not ours to remove: it costs no start
        log.warning("cache_dir: %s cannot be removed (%s): left there", path,
                    e.strerror or e)


def _written(tmp: Path) -> int:
    """Bytes a download has written into its folder so far."""
    try:
        return tree_bytes(tmp)
    except (OSError, LoadFailed):  # a part renamed as it was read: next time
        return 0


def _made_for(path: Path) -> int | None:
    """The `bytes` of a cached copy's manifest; None if it has none (not a
    copy of ours)."""
    try:
        made_for = tomllib.loads(path.read_text()).get("bytes")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return made_for if type(made_for) is int else None


def _stored(spec: ModelSpec, file: str) -> tuple[str, bool]:
    """The name `file` of `spec` has in its copy, and whether it is kept
    compressed there."""
    compressed = spec.compress == "zstd" and file == spec.artifact
    return (file + ZSTD_SUFFIX if compressed else file), compressed


def _written_since(path: Path, spec: ModelSpec, files: list[str]) -> str | None:
    """Which of `files` (`spec`'s of no digest) in the copy at `path` was
    written after the copy was made (its manifest, written last), or is
    gone; None if none was: as far as can be told, they are the bytes
    their source sent."""
    try:
        made = os.stat(path / MANIFEST).st_mtime_ns
    except OSError as e:
        return f"{MANIFEST}: {e.strerror or e}"
    for file in files:
        name = _stored(spec, file)[0]
        try:
            written = os.stat(path / name).st_mtime_ns
        except OSError as e:
            return f"{name}: {e.strerror or e}"
        if written > made:
            return f"{name}: written after the copy was made (it has no digest to check)"
    return None


def _damaged(path: Path, spec: ModelSpec) -> str | None:
    """What of the copy at `path` is not what `spec`'s digests say (the
    compressed artifact read as its source sent it); None if all is."""
    for file, digest in spec.files:
        if not digest:  # not checked as it was fetched either
            continue
        name, compressed = _stored(spec, file)
        sha = hashlib.sha256()
        try:
            with open(path / name, "rb") as raw:
                reader = zstd_reader(raw)[0] if compressed else raw
                with reader:
                    while chunk := reader.read(1 << 20):
                        sha.update(chunk)
        except Exception as e:  # noqa: BLE001 - unreadable, or no zstd frame: damaged
            return f"{name}: {type(e).__name__}: {e}"
        if sha.hexdigest() != digest:
            return f"{name}: sha256 {sha.hexdigest()}, where its manifest says {digest}"
    return None


def _made_from(entry: _Entry, spec: ModelSpec, fp: str) -> bool:
    """Whether `entry` is a copy of `spec` (whose fingerprint is `fp`).
    Copies made before the fingerprint was of the files alone still serve
    while the stub says what it said when they were fetched (the whole
    manifest was hashed), as do those made while a stub without `bytes`
    was sized as it was read (before mmengine-serve asked its source only
    when fetching), hashed with those sizes, which they carry as their
    estimate."""
    if entry.fingerprint == fp:
        return True
    sized = dataclasses.replace(spec, estimated_bytes=spec.estimated_bytes or entry.estimate)
    return entry.fingerprint in (_whole_fingerprint(spec), _whole_fingerprint(sized))


def fingerprint(spec: ModelSpec) -> str:
    """What a cached copy of `spec` was made from, hashed: where its files
    come from, what they must be (their digests) and how the copy keeps
    them (the artifact compressed). A copy whose fingerprint differs is
    stale. The keys that only say how to serve the files (max_batch_size,
    bytes, inputs, options, ...) are no part of it: an edit of them keeps
    the copy, and a load takes them from the stub as it is now (the engine
    sends them with the load), not from the copy's manifest."""
    made_from = json.dumps([spec.source, spec.files, spec.compress and spec.artifact])
    return hashlib.sha256(made_from.encode()).hexdigest()[:16]


def _whole_fingerprint(spec: ModelSpec) -> str:
    """The fingerprint of copies made before it was of the files alone."""
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
    if spec.max_batch_size:
        table["max_batch_size"] = spec.max_batch_size
    if spec.options:
        table["options"] = spec.options
    # No token_sha256: tokens are checked against the stub, whose edit
    # (a token rotated) must not make the copy stale and fetch it again.
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
