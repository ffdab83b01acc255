"""A load's read of a file range in C, the GIL released for the whole of it
(staging.Readers; its pure twin is staging._pread_into paced by _GiveWay).

Why: a CPU worker's load reads in 64 KiB parts while the worker serves, and
waits out each request before the next part. In Python every part took
the GIL back, and every look at the serving thread took it once more: the
serving thread then handed the GIL over and waited for it again in each
request, by futex wake-ups that cost tens of microseconds on a virtual
machine (perf, benchmarks/RESULTS.md session 37). Here the parts, the looks
and the naps run with no GIL at all.

The serving thread's two marks (staging.Serving) are read as it writes
them, with no lock: a look that is a moment late only sizes one part.
"""
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec
from posix.types cimport off_t
from posix.unistd cimport pread

import os

cdef extern from *:
    """
    static inline long long mm_read_mark(const long long *mark) {
        return __atomic_load_n(mark, __ATOMIC_RELAXED);
    }
    """
    long long mm_read_mark(const long long *mark) nogil


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1000000000 + ts.tv_nsec


def read(int fd, unsigned char[::1] out not None, int64_t offset, const long long[::1] marks,
         int64_t chunk, int64_t small, int64_t grace_ns, int64_t nap_ns, int64_t idle_ns):
    """Fills `out` from `fd` at `offset` in parts of `chunk` bytes. With
    `marks` (staging.Serving's: nonzero while a request is being served,
    and when the last one ended), while the worker has served within
    `idle_ns` the parts are `small`, and before each the read waits, in
    naps of `nap_ns`, while a request is being served: for at most as long,
    in all, as it has spent reading, plus `grace_ns` (a nap that overslept
    is a debt the next parts repay). ValueError if the file ends first."""
    cdef Py_ssize_t n = out.shape[0], done = 0, want
    cdef ssize_t got = 0
    cdef const long long *serving = NULL
    cdef const long long *served_at = NULL
    cdef int64_t credit = grace_ns, last, now, until, part
    cdef timespec nap
    cdef int error = 0
    if chunk <= 0 or small <= 0 or nap_ns < 0:
        raise ValueError("parts of at least a byte, naps of no negative length")
    if marks is not None:
        if marks.shape[0] != 2:
            raise ValueError("marks: (serving, served at)")
        serving, served_at = &marks[0], &marks[1]
    nap.tv_sec, nap.tv_nsec = nap_ns // 1000000000, nap_ns % 1000000000
    if n == 0:
        return
    with nogil:
        last = _now_ns()
        while done < n:
            part = chunk
            if serving != NULL:
                now = _now_ns()
                credit += now - last  # the part just read
                if mm_read_mark(serving) != 0 or now - mm_read_mark(served_at) <= idle_ns:
                    if credit > 0 and mm_read_mark(serving) != 0:
                        until = now + credit
                        while now < until and mm_read_mark(serving) != 0:
                            nanosleep(&nap, NULL)
                            now = _now_ns()
                        credit = until - now
                    part = small
                last = now
            want = n - done if n - done < part else part
            got = pread(fd, &out[done], want, <off_t>(offset + done))
            if got < 0:
                if errno == EINTR:
                    continue
                error = errno
                break
            if got == 0:
                break
            done += got
    if error:
        raise OSError(error, os.strerror(error))
    if done < n:
        raise ValueError("file ends inside its tensor data")
