"""The host tier, as the front-end keeps its books.

A model in the host tier is a safetensors file in shared memory (see
mmengine/backends/safetensors.py `publish`) that every worker can map. A
model loaded from its files is published there once it is resident; a model
evicted from a worker stays there (it is demoted, not dropped), and its next
load maps it instead of reading its files: on CPU that is a page-table fill,
on a GPU one copy through pinned buffers.

The front-end names each segment (`mmengine-<front-end pid>-host-…`, so that
a segment outlives the worker that wrote it and is reclaimed only once the
front-end itself is gone), keeps the tier's models in an LRU book of its
own with a byte budget and the engine's watermarks, and is the only one that
unlinks a segment. A model resident on a worker is pinned in the book: its
bytes are in use (on CPU the worker runs on the segment's pages), so only
demoted models are ever dropped to make room.

A byte is charged to one budget. A model resident on a CPU worker runs on
its copy's pages, which are that worker's memory for the model, charged to
its device budget: the copy costs the tier nothing until the model is
demoted, when room is made for it (or, if none can be, it goes). Charged to
both, a CPU server held a resident model's bytes twice against its budgets
and evicted demoted models it had room for. A GPU worker's model is a copy
of its own on the device, so there the host copy is charged here as well.
"""
from __future__ import annotations

import os
import time
import weakref

from mmengine import cache as books
from mmengine import resources, shm
from mmengine.config import Config

Key = tuple[str, int]
#: Room reserved for a segment's header beyond the model's tensor bytes
#: (its data starts page-aligned); corrected to the real size once written,
#: room made for what it takes beyond (HostTier.published).
HEADER_ALLOWANCE = 4096
#: Backends whose loaded bytes can be published to the host tier and loaded
#: from it: modules whose weights can be made views of one flat region.
BACKENDS = frozenset({"safetensors", "torchscript", "export"})


def budget(config: Config) -> int:
    """The host tier's bytes: the configured size, or a quarter of the
    memory for models (resources.memory_for_models: a container's limit
    less the server's own) when it is "auto" (-1); 0 turns the tier off."""
    if config.host_tier_bytes >= 0:
        return config.host_tier_bytes
    return resources.memory_for_models(config, "host_tier_bytes") // 4


class HostTier:
    def __init__(self, config: Config) -> None:
        self.high, self.low = config.high_watermark, config.low_watermark
        self.book = books.Cache(1)  # its budget is set at start (size())
        self._segments: dict[Key, str] = {}
        self._sizes: dict[Key, int] = {}  # each copy's bytes, charged here or not
        self._origins: dict[Key, object] = {}  # what each copy was made from
        self._resident: set[Key] = set()  # each holds one pin
        self._on_cpu: set[Key] = set()  # of them, those a CPU worker runs on: charged there
        self.drops = 0
        # Called with each segment unlinked: workers that mapped it must
        # unmap it for its memory to go.
        self.on_drop = lambda segment: None
        # An embedding process that ends without Engine.stop() still takes
        # its copies with it (as its rings go: ring.py), instead of leaving
        # them in /dev/shm until the next mmengine process reclaims them.
        self._pid = os.getpid()
        weakref.finalize(self, _unlink_all, self._segments, self._pid)

    @property
    def enabled(self) -> bool:
        return self.book.capacity(books.HOST, 0) > 0

    def segment(self, key: Key) -> str | None:
        """The segment a load of `key` can map, if the tier holds it whole."""
        if key in self.book and self.book.entry(key).state == books.READY:
            return self._segments[key]
        return None

    def origin(self, key: Key) -> object:
        """What `key`'s copy was made from (reserve's `origin`)."""
        return self._origins.get(key)

    def reserve(self, key: Key, nbytes: int, on_cpu: bool = False,
                origin: object = None) -> str | None:
        """Makes room for `nbytes` and names the segment `key` is to be
        published to; None if the tier cannot take it (off, too small, or
        every model in it is resident). `on_cpu`: `key` is resident on a CPU
        worker, which will run on the copy: it is resident here from now
        on, and no room is made for it until it is demoted. `origin`: what
        the copy is made from (the engine's, compared before a load maps it)."""
        if not self.enabled or key in self.book:
            return None
        if on_cpu and nbytes > self.budget():
            return None  # it could never be demoted here: the copy would serve nothing
        if not on_cpu and not self._make_room(nbytes):
            return None
        name = shm.new_name("host")
        self.book.insert(key, books.LOADING, 0)
        self._segments[key] = name
        self._sizes[key] = nbytes
        self._origins[key] = origin
        self._charge(key)
        if on_cpu:
            self.set_resident(key, True, on_cpu=True)
        return name

    def published(self, key: Key, segment: str, nbytes: int, now: float) -> None:
        """`segment`, reserved for `key`, is written, `nbytes` long. If the
        reservation was dropped meanwhile (an unload), it goes at once.
        What it takes beyond what it is charged (its reservation, short of
        a header and padding of ~100 bytes a tensor; nothing, for one whose
        CPU worker stopped running it as it was written) needs room: made,
        or the copy goes."""
        if self._segments.get(key) != segment:
            self._unlink(segment)
            return
        more = (0 if key in self._on_cpu else nbytes) - self.book.entry(key).host_bytes
        if more > 0 and not self._room_for(key, more):
            return
        self._sizes[key] = nbytes
        self._charge(key)
        self.book.set_state(key, books.READY)
        self.book.touch(key, now)

    def set_resident(self, key: Key, resident: bool, now: float = 0.0,
                     on_cpu: bool = False) -> None:
        """Whether `key` is resident on a worker (pinned here while it is);
        `on_cpu`: on a CPU worker, which runs on the copy. Demoted, a copy
        a CPU worker ran on needs room here: made, or the copy goes."""
        if key not in self.book:
            return
        if resident:
            if key not in self._resident:
                self._resident.add(key)
                self.book.pin(key)
                self.book.touch(key, now)
            if on_cpu and key not in self._on_cpu:
                self._on_cpu.add(key)
                self._charge(key)
            return
        if key not in self._resident:
            return
        # Room is made while it is still pinned, so that it is none of the
        # victims. A copy still being written gets its room once it is
        # (published): its writer may be the worker whose death this is, and
        # the copy never come (room made at once dropped others for nothing).
        if key in self._on_cpu:
            written = self.book.entry(key).state == books.READY
            if written and not self._room_for(key, self._sizes[key]):
                return
            self._on_cpu.discard(key)
            if written:
                self._charge(key)
        self._resident.discard(key)
        self.book.unpin(key)
        # Used until now: the last of the demoted copies to go (it was
        # ordered by its load, and a model long resident went first).
        self.book.touch(key, now or time.monotonic())

    def run_on(self, key: Key, on_cpu: bool) -> None:
        """Whether a resident copy is charged to the CPU worker that runs on
        it (`on_cpu`) or to the tier. Charged here again, it needs room
        here, as a demoted one: made, or the copy goes (the worker would
        read the files)."""
        if key not in self._resident or (key in self._on_cpu) == on_cpu:
            return
        if not on_cpu and not self._room_for(key, self._sizes[key]):
            return
        if on_cpu:
            self._on_cpu.add(key)
        else:
            self._on_cpu.discard(key)
        self._charge(key)

    def _room_for(self, key: Key, nbytes: int) -> bool:
        """Makes room for `nbytes` more of `key`'s copy; else the copy goes
        (False)."""
        if self._make_room(nbytes):
            return True
        self.drop(key)
        return False

    def _make_room(self, nbytes: int) -> bool:
        """Drops the least recently used demoted copies until `nbytes` more
        fit under the watermarks; False (nothing dropped) if they cannot."""
        victims, reason = self.book.victims(books.HOST, 0, nbytes, self.high, self.low)
        if reason != books.OK:
            return False
        for victim in victims:
            self.drop(victim)
        return True

    def _charge(self, key: Key) -> None:
        self.book.set_bytes(key, books.HOST, 0 if key in self._on_cpu else self._sizes[key])

    def size(self, config: Config) -> None:
        """Sets the budget (budget()): at start, where a bad one is the
        start's error."""
        self.book.set_capacity(books.HOST, 0, budget(config))

    def budget(self) -> int:
        return self.book.capacity(books.HOST, 0)

    def drop(self, key: Key) -> None:
        """Removes `key` from the tier and unlinks its segment. A worker
        that still maps it keeps its pages until it unmaps them."""
        name = self._segments.pop(key, None)
        if name is None:
            return
        del self._sizes[key], self._origins[key]
        self._resident.discard(key)
        self._on_cpu.discard(key)
        self.book.remove(key)
        self.drops += 1
        self._unlink(name)
        self.on_drop(name)

    def abandon(self, key: Key, segment: str) -> None:
        """A publish to `segment` failed: whatever of it exists goes (workers
        that mapped it unmap it), and its reservation, if it still is the
        one `key` holds (a newer one is left alone)."""
        if self._segments.get(key) == segment:
            self.drop(key)
        else:
            self._unlink(segment)
            self.on_drop(segment)

    def least_recent(self) -> Key | None:
        """The least recently used model that no worker holds."""
        for key in self.book.lru_keys():
            e = self.book.entry(key)
            if e.state == books.READY and e.pins == 0:
                return key
        return None

    def keys(self) -> list[Key]:
        return list(self._segments)

    def _unlink(self, segment: str) -> None:
        if os.getpid() == self._pid:  # in a forked child, the segments are the parent's
            _unlink(segment)

    def clear(self) -> None:
        for key in list(self._segments):
            self.drop(key)

    def bytes(self, key: Key) -> int:
        """The bytes of `key`'s copy once written (0 while it is written),
        charged here or not."""
        return self._sizes[key] if self.segment(key) else 0

    def stats(self) -> dict:
        return {"bytes": self.book.used(books.HOST, 0),
                "budget_bytes": self.budget(),
                "cpu_worker_bytes": sum(self._sizes[k] for k in self._on_cpu),
                "models": len(self.book), "drops": self.drops}


def _unlink_all(segments: dict[Key, str], pid: int) -> None:
    if os.getpid() != pid:  # a forked child, exiting: they are its parent's
        return
    for segment in list(segments.values()):
        _unlink(segment)


def _unlink(segment: str) -> None:
    try:
        os.unlink(os.path.join(shm.SHM_DIR, segment))
    except FileNotFoundError:
        pass  # its publish never got as far as creating it
