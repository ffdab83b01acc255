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

A read given a Slot is also put there for the serving thread itself to
help with while it waits for requests (csrc/readjob.h): on cores that
serving keeps busy, the gaps between requests are the load's best time,
and a reader thread could only run by taking a core from a request.
"""
from cpython.pycapsule cimport PyCapsule_New
from libc.stdint cimport int64_t
from libc.string cimport memset
from posix.time cimport nanosleep, timespec

import os

cdef extern from *:
    """
    static inline long long mm_read_mark(const long long *mark) {
        return __atomic_load_n(mark, __ATOMIC_RELAXED);
    }
    """
    long long mm_read_mark(const long long *mark) nogil


cdef extern from "readjob.h" nogil:
    ctypedef struct mm_readjob:
        int owned
        int active
        int stepping
        int fd
        unsigned char *out
        int64_t n
        int64_t offset
        int64_t part
        int64_t next
        int error
        int64_t helped_at
        int64_t helped
    int64_t mm_readjob_now()
    int64_t mm_readjob_claim(mm_readjob *j, int64_t want, int64_t *got)
    void mm_readjob_fill(mm_readjob *j, int64_t at, int64_t want)
    void mm_readjob_open(mm_readjob *j)
    void mm_readjob_close(mm_readjob *j)
    int64_t mm_readjob_helped_at(mm_readjob *j)
    int mm_readjob_error(mm_readjob *j)
    int64_t mm_readjob_helped(mm_readjob *j)
    int mm_readjob_take(mm_readjob *j)
    void mm_readjob_give(mm_readjob *j)


cdef class Slot:
    """A worker's one read slot that its serving thread helps with while it
    waits for requests (csrc/readjob.h; NativeRing.help_reads)."""
    cdef mm_readjob job
    cdef readonly object capsule

    def __cinit__(self):
        memset(&self.job, 0, sizeof(self.job))
        self.capsule = PyCapsule_New(&self.job, b"mmengine.readjob", NULL)

    @property
    def helped(self):
        """The bytes that waiting serving threads have read, over all reads."""
        return mm_readjob_helped(&self.job)


def read(int fd, unsigned char[::1] out not None, int64_t offset, const long long[::1] marks,
         int64_t chunk, int64_t small, int64_t grace_ns, int64_t nap_ns, int64_t idle_ns,
         Slot slot=None, int64_t help_part=0, int64_t help_ns=0, int64_t help_nap_ns=0):
    """Fills `out` from `fd` at `offset` in parts of `chunk` bytes. With
    `marks` (staging.Serving's: nonzero while a request is being served,
    and when the last one ended), while the worker has served within
    `idle_ns` the parts are `small`, and before each the read waits, in
    naps of `nap_ns`, while a request is being served: for at most as long,
    in all, as it has spent reading, plus `grace_ns` (a nap that overslept
    is a debt the next parts repay). With `slot` as well, the read is put
    there for the serving thread to help with between its requests, in
    parts of `help_part`; while it has helped within `help_ns`, this thread
    claims nothing and naps `help_nap_ns`. ValueError if the file ends
    first."""
    cdef Py_ssize_t n = out.shape[0]
    cdef const long long *serving = NULL
    cdef const long long *served_at = NULL
    cdef int64_t credit = grace_ns, last, now, until, part, at, want = 0
    cdef timespec nap, help_nap
    cdef int error = 0
    cdef mm_readjob local
    cdef mm_readjob *job = &local
    if chunk <= 0 or small <= 0 or nap_ns < 0 or help_nap_ns < 0 or (slot and help_part <= 0):
        raise ValueError("parts of at least a byte, naps of no negative length")
    if marks is not None:
        if marks.shape[0] != 2:
            raise ValueError("marks: (serving, served at)")
        serving, served_at = &marks[0], &marks[1]
        if slot is not None and mm_readjob_take(&slot.job):  # one read at a time uses it
            job = &slot.job
    nap.tv_sec, nap.tv_nsec = nap_ns // 1000000000, nap_ns % 1000000000
    help_nap.tv_sec, help_nap.tv_nsec = help_nap_ns // 1000000000, help_nap_ns % 1000000000
    if n == 0:
        if job != &local:
            mm_readjob_give(job)
        return
    memset(&local, 0, sizeof(local))
    job.fd, job.out, job.n, job.offset, job.part = fd, &out[0], n, offset, help_part
    with nogil:
        mm_readjob_open(job)
        last = mm_readjob_now()
        while True:
            part = chunk
            if serving != NULL:
                now = mm_readjob_now()
                credit += now - last  # the part just read
                if (job != &local and now - mm_readjob_helped_at(job) <= help_ns
                        and not mm_readjob_error(job)):
                    nanosleep(&help_nap, NULL)  # the serving thread reads meanwhile
                    last = mm_readjob_now()
                    continue
                if mm_read_mark(serving) != 0 or now - mm_read_mark(served_at) <= idle_ns:
                    if credit > 0 and mm_read_mark(serving) != 0:
                        until = now + credit
                        while (now < until and mm_read_mark(serving) != 0
                               and not mm_readjob_error(job)):
                            nanosleep(&nap, NULL)
                            now = mm_readjob_now()
                        credit = until - now
                    part = small
                last = now
            at = mm_readjob_claim(job, part, &want)
            if at < 0:
                break
            mm_readjob_fill(job, at, want)
            if mm_readjob_error(job):
                break
        mm_readjob_close(job)
        error = mm_readjob_error(job)
        if job != &local:
            mm_readjob_give(job)
    if error > 0:
        raise OSError(error, os.strerror(error))
    if error:
        raise ValueError("file ends inside its tensor data")
