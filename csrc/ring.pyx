"""The native ring's operations; mmengine/ring.py adds the segment, the
eventfds and the handle around them and documents the layout."""
from cpython.buffer cimport PyBUF_SIMPLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.exc cimport PyErr_CheckSignals
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.errno cimport EINTR, errno
from libc.stdint cimport UINT64_MAX, int64_t, uint8_t, uint32_t, uint64_t

from ring cimport *

from mmengine.errors import (InternalError, PeerDied, RecordTooLarge,
                             RingClosed, RingCorrupt, RingTimeout)

cdef extern from "<sched.h>" nogil:
    int sched_getcpu()

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void *value, socklen_t *length)
    enum:
        SOL_SOCKET
        SO_INCOMING_CPU


def this_cpu():
    """The CPU the calling thread runs on; -1 where it cannot be told
    (glibc reads it from rseq or the vDSO, without a system call)."""
    return sched_getcpu()


def incoming_cpu(int fd):
    """The CPU that last took in a segment that came to socket `fd`
    (SO_INCOMING_CPU: over loopback, the sender's); -1 where it cannot be
    told."""
    cdef int cpu = -1
    cdef socklen_t length = sizeof(cpu)
    if getsockopt(fd, SOL_SOCKET, SO_INCOMING_CPU, &cpu, &length) != 0:
        return -1
    return cpu


def _release_view(view):
    try:
        view.release()
    except BufferError:
        pass  # something still exports it; the mapping lives until that goes


# Waiting for a record while holding others could wait forever: the
# producer may need exactly their space.
_WAIT_HOLDING = "get: release() the records you hold before waiting for more"

HEADER_BYTES = MM_RING_HEADER_BYTES
MAX_PARTS = MM_RING_MAX_PARTS
# mm_ring_preempted's rule (mmengine.ring.BackOff has the same).
PREEMPTED_NS = MM_RING_PREEMPTED_NS
TAKEN_SHARE = MM_RING_TAKEN_SHARE
TURN_NS = MM_RING_TURN_NS
CONTENDED_WITHIN = MM_RING_CONTENDED_WITHIN
BACKOFF_NS = MM_RING_BACKOFF_NS
MAX_BACKOFF_NS = MM_RING_MAX_BACKOFF_NS

# A record's first part (its header) up to this size comes out of get() as
# bytes: copying it costs less than making a view (mmengine/ring.py says the
# same for the twin).
DEF _COPY_HEADER_BYTES = 256
COPY_HEADER_BYTES = _COPY_HEADER_BYTES

# Records above this many bytes are copied with the GIL released.
DEF NOGIL_COPY_BYTES = 65536
# How long a waiter spins before it releases the GIL (see _spin).
DEF SPIN_WITH_GIL_NS = 3000


cdef int raise_status(int status, str what) except -1:
    """The one place that turns a native status into a typed exception."""
    if status == MM_RING_TOO_BIG:
        raise RecordTooLarge(f"{what}: record larger than the ring's largest")
    if status == MM_RING_CLOSED:
        raise RingClosed(f"{what}: the peer closed the ring")
    if status == MM_RING_TIMEOUT:
        raise RingTimeout(f"{what}: timed out")
    if status == MM_RING_PEER_DIED:
        raise PeerDied(f"{what}: the process at the other end exited")
    if status == MM_RING_ERRNO:
        raise OSError(errno, f"{what}: system call failed")
    if status == MM_RING_CORRUPT:
        raise RingCorrupt(f"{what}: the peer wrote what is no record")
    raise InternalError(f"{what}: ring status {status}")


# Spins are bounded (an hour), so that microseconds convert to nanoseconds.
_MAX_SPIN_US = 3.6e9
_LONGEST_WAIT_S = 1e9  # mmengine.ring.LONGEST_WAIT_S: int64 nanoseconds hold it

# Deadlines are computed when a call first has to wait: most calls do not,
# and a clock read is a tenth of a round trip through a ring.
DEF _NO_DEADLINE_YET = -2
# A wait begun before the peer attached cannot watch its pidfd: it wakes
# this often to look for one (a peer that attaches, then dies, is noticed).
DEF _PEER_LOOK_NS = 100000000


cdef inline int64_t _deadline_ns(int64_t timeout_ns):
    return -1 if timeout_ns < 0 else <int64_t>mm_now_ns() + timeout_ns


cdef inline int64_t _timeout_ns(object timeout) except? -2:
    if timeout is None or timeout >= _LONGEST_WAIT_S:  # inf too: waits for good
        return -1
    if not timeout >= 0:  # NaN too
        raise ValueError("timeout must be >= 0 or None")
    return <int64_t>(timeout * 1e9)


cdef class RingCore:
    """Operations over a mapped ring. Subclassed by mmengine.ring.NativeRing,
    which supplies `_peer_pidfd()` and the life cycle."""

    cdef mm_ring r
    cdef Py_buffer buf
    cdef bint bound
    cdef object view       # memoryview of the whole mapping, sliced per part
    cdef object mapping
    # mm_now_ns() when the last get's wait ended, taken before the GIL is
    # taken back (0: it found its record without waiting): a waiter's
    # wake-up and its wait for the GIL can then be told apart.
    cdef readonly uint64_t woke_ns
    cdef object helped     # the read slot a waiter helps with (mmengine._reads.Slot)

    def _bind_ops(self, mapping, int data_fd, int space_fd, bint is_creator, double spin_us):
        PyObject_GetBuffer(mapping, &self.buf, PyBUF_SIMPLE)
        self.bound = True
        self.mapping = mapping
        self.view = memoryview(mapping)
        mm_ring_bind(&self.r, self.buf.buf, data_fd, space_fd, is_creator,
                     <uint64_t>(spin_us * 1000.0))

    def _unbind(self):
        if self.bound:
            self.bound = False
            mm_ring_unbind(&self.r)
            _release_view(self.view)
            self.view = None
            PyBuffer_Release(&self.buf)
            self.mapping = None

    def __dealloc__(self):
        if self.bound:
            mm_ring_unbind(&self.r)
            PyBuffer_Release(&self.buf)

    cdef inline int _check(self) except -1:
        if not self.bound:
            raise ValueError("ring is closed")
        return 0

    # -- producer ----------------------------------------------------------

    cdef int _put(self, object header, tuple buffers, int64_t timeout_ns, bint hold) except -1:
        cdef Py_buffer views[MM_RING_MAX_PARTS]
        cdef bint exported[MM_RING_MAX_PARTS]
        cdef const uint8_t *ptrs[MM_RING_MAX_PARTS]
        cdef uint64_t lens[MM_RING_MAX_PARTS]
        cdef uint32_t n = 0, i
        cdef int status
        cdef uint64_t size
        cdef int64_t deadline
        self._check()
        if len(buffers) + 1 > MM_RING_MAX_PARTS:
            raise RecordTooLarge(f"put: at most {MM_RING_MAX_PARTS} parts in a record")
        cdef uint32_t nparts = 1 + <uint32_t>len(buffers)
        try:
            # bytes (every msgpack header) need no buffer export; anything
            # else is exported for the duration of the copy.
            for i in range(nparts):
                obj = header if i == 0 else buffers[i - 1]
                exported[i] = not PyBytes_CheckExact(obj)
                if not exported[i]:
                    ptrs[i] = <const uint8_t *>PyBytes_AS_STRING(obj)
                    lens[i] = <uint64_t>PyBytes_GET_SIZE(obj)
                else:
                    PyObject_GetBuffer(obj, &views[i], PyBUF_SIMPLE)
                    ptrs[i] = <const uint8_t *>views[i].buf
                    lens[i] = <uint64_t>views[i].len
                n = i + 1
            size = mm_ring_record_size(nparts, lens)
            deadline = _NO_DEADLINE_YET  # a clock read only if there is no room
            while True:
                if size >= NOGIL_COPY_BYTES:
                    with nogil:
                        status = mm_ring_try_put(&self.r, nparts, ptrs, lens, hold)
                else:
                    status = mm_ring_try_put(&self.r, nparts, ptrs, lens, hold)
                if status != MM_RING_AGAIN:
                    break
                if timeout_ns == 0:
                    return 0
                if not self._spin(0, size):
                    if deadline == _NO_DEADLINE_YET:
                        deadline = _deadline_ns(timeout_ns)
                    self._wait(0, size, deadline)
            if status != MM_RING_OK:
                raise_status(status, "put")
            return 1
        finally:
            for i in range(n):
                if exported[i]:
                    PyBuffer_Release(&views[i])

    def try_put(self, header, *buffers, bint hold=False):
        """Writes one record if there is room now; returns whether it did.
        `hold`: the consumer sees it only at publish(), close(), the next
        put without hold that writes its record, or a put that finds no
        room (which publishes what is held: only the consumer can make
        room)."""
        return self._put(header, buffers, 0, hold) == 1

    def publish(self):
        """Lets the consumer see the records put with `hold`."""
        self._check()
        mm_ring_publish(&self.r)

    def _mark_closed(self):
        """Says this end is closed, ordered after every record it published."""
        self._check()
        mm_ring_close_end(&self.r)

    def put(self, header, *buffers, timeout=None):
        """Writes one record, waiting up to `timeout` seconds for room."""
        cdef int64_t t = _timeout_ns(timeout)
        if t == 0:
            t = 1  # zero means "wait not at all" inside _put; keep one attempt
        self._put(header, buffers, t, False)

    def record_size(self, *lengths):
        """Bytes a record of parts with these lengths takes in the ring."""
        cdef uint64_t lens[MM_RING_MAX_PARTS]
        if len(lengths) > MM_RING_MAX_PARTS:
            raise RecordTooLarge(f"at most {MM_RING_MAX_PARTS} parts in a record")
        for i, n in enumerate(lengths):
            lens[i] = n
        cdef uint64_t size = mm_ring_record_size(len(lengths), lens)
        if size == UINT64_MAX:  # no record holds it: its exact size all the same, as the twin's
            return 8 + mm_align8(4 * len(lengths)) + sum((n + 7) & ~7 for n in lengths)
        return size

    # -- consumer ----------------------------------------------------------

    cdef list _parts(self, const uint8_t *rec):
        # The lengths as mm_ring_try_get checked them, not the shared copy.
        cdef uint32_t n = self.r.rec_nparts, i
        cdef Py_ssize_t off = (rec - <const uint8_t *>self.buf.buf) + 8 + mm_align8(4 * n)
        cdef Py_ssize_t ln
        cdef list parts = []
        cdef const char *base = <const char *>self.buf.buf
        for i in range(n):
            ln = self.r.rec_lens[i]
            if i == 0 and ln <= _COPY_HEADER_BYTES:
                parts.append(PyBytes_FromStringAndSize(base + off, ln))
            else:
                parts.append(self.view[off:off + ln])
            off += mm_align8(ln)
        return parts

    cdef object _get(self, int64_t timeout_ns):
        cdef const uint8_t *rec = NULL
        cdef int status
        cdef int64_t deadline = _NO_DEADLINE_YET  # a clock read only if it must wait
        self._check()
        while True:
            status = mm_ring_try_get(&self.r, &rec)
            if status == MM_RING_OK:
                return self._parts(rec)
            if status != MM_RING_AGAIN:
                raise_status(status, "get")
            if timeout_ns == 0:
                return None
            if self.r.held:
                raise InternalError(_WAIT_HOLDING)
            if not self._spin(1, 0):
                if deadline == _NO_DEADLINE_YET:
                    deadline = _deadline_ns(timeout_ns)
                self._wait(1, 0, deadline)

    def try_get(self):
        """The next record as [header, *buffers] views, or None if empty.
        The views of every record got since the last release() stay valid
        until the next release()."""
        return self._get(0)

    def get(self, timeout=None):
        """The next record, waiting up to `timeout` seconds for one."""
        cdef int64_t t = _timeout_ns(timeout)
        self.woke_ns = 0
        return self._get(1 if t == 0 else t)

    def release(self):
        """Hands the space of every record got so far back to the producer."""
        self._check()
        if not self.r.held:
            raise InternalError("release: no record is held")
        mm_ring_release(&self.r)

    @property
    def spin_us(self):
        """How long this side spins before it parks; another thread may set
        it while this one waits (from its next wait on)."""
        return mm_ring_spin(&self.r) / 1000.0

    @spin_us.setter
    def spin_us(self, double us):
        if not 0 <= us < _MAX_SPIN_US:
            raise ValueError(f"spin_us must be >= 0 and < {_MAX_SPIN_US:g}")
        mm_ring_set_spin(&self.r, <uint64_t>(us * 1000.0))

    def help_reads(self, slot):
        """While this side waits to get a record, it reads parts of the
        load in `slot` (mmengine._reads.Slot) when one is under way: a
        worker's serving thread, between requests (csrc/readjob.h). Set
        before the ring is waited on."""
        self._check()
        self.r.idle_arg = PyCapsule_GetPointer(slot.capsule, b"mmengine.readjob")
        self.r.idle_step = mm_readjob_step
        self.helped = slot

    @property
    def backoffs(self):
        """The consumer's back-offs and the producer's (mm_ring_preempted),
        modulo 2**32."""
        self._check()
        return mm_ring_backoffs(&self.r, 1), mm_ring_backoffs(&self.r, 0)

    @property
    def taken(self):
        """Records the consumer has got so far (wrap markers aside),
        whichever side asks: the producer learns from it which of its
        records a consumer that died never read."""
        self._check()
        return mm_ring_taken(&self.r)

    @property
    def held(self):
        """Bytes of the records got and not yet released."""
        return self.r.held

    # -- waiting -----------------------------------------------------------

    cdef bint _spin(self, int for_read, uint64_t need):
        """A few µs of spinning with the GIL held, before _wait releases it
        and looks up the peer: an answer that is about to arrive is caught
        without either cost. Short enough not to starve other threads."""
        cdef uint64_t spin_ns = mm_ring_spin(&self.r)
        cdef uint64_t end = mm_now_ns() + (SPIN_WITH_GIL_NS if spin_ns > SPIN_WITH_GIL_NS
                                           else spin_ns)
        cdef unsigned i = 0
        while True:
            if (mm_ring_readable(&self.r) if for_read else mm_ring_writable(&self.r, need)):
                return True
            i += 1
            if (i & 63) == 0 and mm_now_ns() >= end:
                return False
            mm_cpu_relax()

    cdef int _wait(self, int for_read, uint64_t need, int64_t deadline) except -1:
        """Waits until `deadline` (mm_now_ns() clock; -1: none), so that the
        retries of one put or get share one timeout."""
        cdef int status
        cdef int64_t left, wait
        cdef uint64_t woke
        cdef int pidfd = -1
        while True:
            # A signal's handler (PyErr_CheckSignals, below) or the peer's
            # look may have closed this ring: its mapping is gone.
            self._check()
            if pidfd < 0:
                pidfd = self._peer_pidfd()
            left = -1
            if deadline >= 0:
                left = deadline - <int64_t>mm_now_ns()
                if left < 0:
                    left = 0
            wait = left
            if pidfd < 0 and (wait < 0 or wait > _PEER_LOOK_NS):
                wait = _PEER_LOOK_NS
            with nogil:
                status = mm_ring_wait(&self.r, for_read, need, wait, pidfd)
                woke = mm_now_ns()
            if status == MM_RING_OK:
                if for_read:
                    self.woke_ns = woke
                return 0
            if status == MM_RING_ERRNO and errno == EINTR:
                PyErr_CheckSignals()
                continue
            if status == MM_RING_TIMEOUT and wait != left:
                continue  # a look for the peer is due, not the deadline
            raise_status(status, "get" if for_read else "put")

    def arm_read(self):
        """Before an asyncio consumer sleeps on readable_fd: True if it may
        (the ring is still empty), False if a record is already there."""
        self._check()
        return mm_ring_park(&self.r, 1, 0) == 1

    def disarm_read(self):
        """When readable_fd fires: stop asking the producer for wake-ups."""
        self._check()
        mm_ring_unpark(&self.r, 1)

    def arm_write(self, uint64_t need):
        self._check()
        return mm_ring_park(&self.r, 0, need) == 1

    def disarm_write(self):
        self._check()
        mm_ring_unpark(&self.r, 0)
