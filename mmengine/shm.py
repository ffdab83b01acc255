"""Named shared-memory segments that never outlive their creator for long.

Every segment is a file in /dev/shm named
``mmengine-<creator pid>-<kind>-<random>.<creator's start time>``. Only the
creator unlinks it. A creator killed before it could (SIGKILL, OOM) leaves
its segment behind; `reclaim_orphans` removes every segment whose creator
is no longer alive, and the first `Segment.create` of each process calls
it, so nothing leaks across runs. The start time tells a creator from a
later process of the same pid: a container's server is pid 1 each time it
restarts, and took its predecessor's segments for its own.

Segments are mapped with Python's mmap, so the mapping lives exactly as long
as anything (a memoryview, a numpy array) still exports it, even after close().
"""
from __future__ import annotations

import mmap
import os
import secrets
import shutil
import threading

PREFIX = "mmengine-"
SHM_DIR = "/dev/shm"

_reclaimed = False
_reclaim_lock = threading.Lock()

_MADV_POPULATE_READ = 22  # Linux 5.14 on; the mmap module does not name it yet
_madvise = None  # libc's, bound on first use; False where it cannot populate


def populate(address: int, length: int) -> bool:
    """Fills the page table of a shared mapping's pages [address, address +
    length) now, the GIL released: MAP_POPULATE, and mmap.madvise, hold it
    through the whole pass (~3 ms per 64 MiB), which every request on the
    worker's serving thread would wait for. False where the kernel cannot
    (before 5.14): callers map with MAP_POPULATE instead (`map_flags`)."""
    global _madvise
    if _madvise is None:
        import ctypes  # a foreign call through CDLL drops the GIL

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise = libc.madvise
    if _madvise is False:
        return False
    if length and _madvise(address, length, _MADV_POPULATE_READ) != 0:
        _madvise = False
        return False
    return True


def map_flags() -> int:
    """mmap flags for a shared mapping that `populate` fills: MAP_POPULATE
    too where it cannot."""
    return mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if _madvise is False else 0)


def pid_alive(pid: int) -> bool:
    """True if `pid` runs; a zombie (exited, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # The state follows the command name, which is in parentheses and
            # may itself contain spaces or parentheses.
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def start_of(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, as /proc says);
    None if that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # starttime is the 22nd field, the 20th after the command name,
            # which is in parentheses and may hold spaces or parentheses.
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def new_name(kind: str) -> str:
    """A new segment's name, this process's."""
    start = start_of(os.getpid())
    return f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}" + (f".{start}" if start else "")


def _creator(name: str) -> tuple[int | None, str | None]:
    """The pid and start time of the process that named the segment (the
    start time None in names without one)."""
    head, _, start = name.rpartition(".") if "." in name else (name, "", None)
    try:
        return int(head[len(PREFIX):].split("-", 1)[0]), start
    except ValueError:
        return None, None


def _orphaned(name: str) -> bool:
    pid, start = _creator(name)
    if pid is None:
        return False  # not named by us: not ours to remove
    if not pid_alive(pid):
        return True
    # A live process of that pid: its creator, unless it started at another
    # time (the pid was reused: this very process, in a restarted container).
    now = start_of(pid)
    return start is not None and now is not None and now != start


def list_segments() -> list[str]:
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def reclaim_orphans() -> list[str]:
    """Unlinks the segments of creators that died; returns their names."""
    gone = []
    for name in list_segments():
        if not _orphaned(name):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            gone.append(name)
        except FileNotFoundError:
            pass  # another process reclaimed it first
    return gone


def _reclaim_once() -> None:
    global _reclaimed
    with _reclaim_lock:
        if not _reclaimed:
            _reclaimed = True
            reclaim_orphans()


class Segment:
    """One mapped segment. `create` makes (and owns) it, `attach` maps it."""

    __slots__ = ("name", "size", "map", "owner", "pid", "__weakref__")

    def __init__(self, name: str, size: int, map_: mmap.mmap, owner: bool):
        self.name = name
        self.size = size
        self.map = map_
        self.owner = owner
        self.pid = os.getpid()  # a child forked from its owner owns nothing

    @classmethod
    def create(cls, size: int, kind: str) -> "Segment":
        _reclaim_once()
        name = new_name(kind)
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            # Every page now: a /dev/shm too small (a container's 64 MiB)
            # fails here, saying so, not later as a SIGBUS wherever a page
            # is first touched (a sparse segment's were).
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                free = shutil.disk_usage(SHM_DIR).free
                raise OSError(e.errno, f"{SHM_DIR} has no room for a shared-memory segment "
                              f"of {size} bytes ({free} free): give it more (docker run "
                              f"--shm-size), or lower ring_bytes") from None
            map_ = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, size, map_, owner=True)

    @classmethod
    def attach(cls, name: str) -> "Segment":
        if not name.startswith(PREFIX) or "/" in name:
            raise ValueError(f"not an mmengine segment: {name!r}")
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            map_ = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, map_, owner=False)

    def close(self) -> None:
        """Unmaps (once nothing exports the mapping) and, if owned, unlinks."""
        try:
            self.map.close()
        except BufferError:
            pass  # views are alive; the mapping goes when the last one does
        if self.owner and self.pid == os.getpid():
            self.owner = False
            try:
                os.unlink(os.path.join(SHM_DIR, self.name))
            except FileNotFoundError:
                pass
