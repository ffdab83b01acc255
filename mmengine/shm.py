"""Named shared-memory segments that never outlive their creator for long.

Every segment is a file in /dev/shm named
``mmengine-<creator pid>-<kind>-<random>~<creator's life>``. Only the
creator unlinks it. A creator killed before it could (SIGKILL, OOM) leaves
its segment behind; `reclaim_orphans` removes every segment whose creator
is no longer alive, and the first `Segment.create` of each process calls
it, so nothing leaks across runs.

"Alive" is a lock, not a pid. Each creating process holds a shared flock on
a file of its own, ``mmengine~<life>``, for as long as it runs (the kernel
drops it however the process ends); a segment whose life file can be locked
exclusively, or is gone, is an orphan. Pids could not say: /dev/shm may be
shared by servers in different pid namespaces (containers with the host's
IPC namespace, pods sharing an emptyDir), where another server's pid means
nothing here or names one of ours, and a server that looked its neighbours'
pids up removed their live segments. (A restarted container's server, pid 1
each time, also took its predecessor's segments for its own.) Names without
a life, from before, are judged by pid and start time as they were.

Segments are mapped with Python's mmap, so the mapping lives exactly as long
as anything (a memoryview, a numpy array) still exports it, even after close().
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import mmap
import os
import secrets
import shutil
import stat
import threading

import numpy as np

PREFIX = "mmengine-"
LIFE_PREFIX = "mmengine~"  # not PREFIX: a life file is no segment
SHM_DIR = "/dev/shm"

_reclaimed = False
_reclaim_lock = threading.Lock()
_life: tuple[int, str, int] | None = None  # this process's: (pid, life, locked fd)
_life_lock = threading.Lock()

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
        _madvise = _libc_madvise()
    if _madvise is False:
        return False
    if length and _madvise(address, length, _MADV_POPULATE_READ) != 0:
        _madvise = False
        return False
    return True


@functools.cache
def _libc_madvise():
    import ctypes  # a foreign call through CDLL drops the GIL

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def map_flags() -> int:
    """mmap flags for a shared mapping that `populate` fills: MAP_POPULATE
    too where it cannot."""
    return mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if _madvise is False else 0)


_MADV_DONTNEED = 4
_PAGEMAP_PRESENT, _PAGEMAP_FILE = 1 << 63, 1 << 61


def revert_written(address: int, length: int) -> bool:
    """Gives the pages of a private mapping of a segment that a model wrote
    (copied on its write) back to the segment's, and says whether there
    were any: /proc/self/pagemap tells a written page by its being no
    longer the file's (8 bytes a page: ~0.5 ms per 256 MiB)."""
    page = mmap.PAGESIZE
    first, last = address // page, (address + length + page - 1) // page
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            entries = np.frombuffer(os.pread(f.fileno(), (last - first) * 8, first * 8),
                                    np.uint64)
    except OSError:  # no pagemap (a sandbox): say written, and revert to be sure
        entries = np.array([_PAGEMAP_PRESENT], np.uint64)
    written = entries & np.uint64(_PAGEMAP_PRESENT | _PAGEMAP_FILE)
    if not (written == np.uint64(_PAGEMAP_PRESENT)).any():
        return False
    _libc_madvise()(first * page, (last - first) * page, _MADV_DONTNEED)
    populate(first * page, (last - first) * page)
    return True


def private_map_flags() -> int:
    """mmap flags for a copy-on-write mapping that `populate` fills: never
    MAP_POPULATE, which on a writable private mapping copies every page
    (where populate's MADV_POPULATE_READ maps the shared ones); without
    that madvise, pages come in as they are first touched."""
    return mmap.MAP_PRIVATE


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


def life() -> str | None:
    """This process's life (see the module's doc), its file made and locked
    on first use; None where no file can be made there."""
    global _life
    pid = os.getpid()
    with _life_lock:
        if _life is not None and _life[0] == pid:
            return _life[1]
        token = secrets.token_hex(8)
        path = os.path.join(SHM_DIR, LIFE_PREFIX + token)
        # Locked under a hidden name, then renamed into place: a life file
        # is never seen unlocked while its process runs. (A reclaimer removes
        # a hidden one it can lock: one that was never locked, its maker
        # killed between the two steps, or caught between them, finds its
        # file gone and names its segments by pid.)
        hidden = os.path.join(SHM_DIR, f".{LIFE_PREFIX}{token}")
        try:
            fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.rename(hidden, path)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(hidden)
            return None
        if _life is None:  # the first life of this process's line: ended at its exit
            atexit.register(_end_life)
        _life = (pid, token, fd)
        return token


def _forget_life_in_child() -> None:
    """A forked child makes a life of its own: its parent's lock is the
    parent's (it stays held while either holds the descriptor, so the child
    lets go of it). No fork comes while a life is made: the lock is held
    across each fork."""
    global _life, _reclaim_lock
    _life_lock.release()
    _reclaim_lock = threading.Lock()  # a reclaim the parent was in is not the child's
    if _life is not None:
        with contextlib.suppress(OSError):
            os.close(_life[2])
        _life = None


os.register_at_fork(before=_life_lock.acquire, after_in_parent=_life_lock.release,
                    after_in_child=_forget_life_in_child)


def _end_life() -> None:
    """At exit, the life file, once none of its segments is left (those of
    an engine never stopped are unlinked by finalizers that may run after
    this): one left is removed by the next reclaim, as its lock ends with
    the process."""
    if _life is None or _life[0] != os.getpid():
        return
    ending = "~" + _life[1]
    if not any(name.endswith(ending) for name in list_segments()):
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(SHM_DIR, LIFE_PREFIX + _life[1]))


def new_name(kind: str) -> str:
    """A new segment's name, this process's."""
    token = life()
    if token is not None:
        return f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}~{token}"
    start = start_of(os.getpid())  # no life file: judged by pid, as before
    return f"{PREFIX}{os.getpid()}-{kind}-{secrets.token_hex(6)}" + (f".{start}" if start else "")


def _creator(name: str) -> tuple[int | None, str | None]:
    """The pid and start time of the process that named the segment (the
    start time None in names without one)."""
    head, _, start = name.rpartition(".") if "." in name else (name, "", None)
    try:
        return int(head[len(PREFIX):].split("-", 1)[0]), start
    except ValueError:
        return None, None


def _life_ended(token: str, name: str = LIFE_PREFIX) -> bool:
    """Whether the process of life `token` is gone: its file (`name` +
    `token`) is, or can be locked exclusively. Not where it cannot be read
    (another user's)."""
    try:
        # Never blocking, never through a link: /dev/shm is anyone's to write
        # in, and a FIFO of that name would hold the open (and the engine's
        # start) for ever.
        fd = os.open(os.path.join(SHM_DIR, name + token),
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False  # no life file of ours
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:  # held (EWOULDBLOCK): alive
        return False
    finally:
        os.close(fd)


def _orphaned(name: str, ended: dict[str, bool]) -> bool:
    """Whether segment `name`'s creator is gone; `ended`, the lives judged
    so far in this pass."""
    if "~" in name:
        token = name.rpartition("~")[2]
        if token not in ended:
            ended[token] = _life_ended(token)
        return ended[token]
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
    """Unlinks the segments of creators that died, and their life files;
    returns the segments' names."""
    gone = []
    ended: dict[str, bool] = {}
    for name in list_segments():
        if not _orphaned(name, ended):
            continue
        try:
            os.unlink(os.path.join(SHM_DIR, name))
            gone.append(name)
        except FileNotFoundError:
            pass  # another process reclaimed it first
        except OSError:
            pass  # another user's, in a sticky /dev/shm: not ours to remove
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        names = []
    # Life files of the ended, and those of processes that died before they
    # renamed theirs into place (one caught in that instant, its file not
    # locked yet, finds it gone and names its segments by pid).
    for prefix in (LIFE_PREFIX, "." + LIFE_PREFIX):
        for token in (n[len(prefix):] for n in names if n.startswith(prefix)):
            if ended[token] if prefix == LIFE_PREFIX and token in ended else _life_ended(
                    token, prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(SHM_DIR, prefix + token))
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
