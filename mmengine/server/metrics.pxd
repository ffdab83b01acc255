# Declares the request counters as extension types where metrics.py is
# compiled (setup.py), as workers.pxd does the workers': a request counted
# is a few updates of C struct fields and C calls, not attribute and method
# look-ups (the observers' share of the front-end's samples on a tiny
# model's call was ~10%). The source runs unchanged where it is not
# compiled.

cimport cython


cdef class _Histogram:
    cdef public tuple bounds
    cdef public list counts
    cdef public double sum
    cpdef observe(self, double value)


cdef class _ModelRequests:
    cdef public dict codes, latency
    cdef public _Histogram compute
    cdef public double wait_s, queue_s
    cpdef ran(self, t_sent, t_recv, t_done, failed_call=*)


cdef class _VersionRequests:
    # Python ints: nanoseconds summed over a server's life may pass 2**63.
    cdef public object success, success_ns, fail, fail_ns, queue_ns, compute_ns
    cdef public object return_ns, last_ns
    cdef public double calls


cdef class Metrics:
    cdef public object engine, registry
    cdef public _Histogram _load_seconds
    cdef public dict _requests, _responses, _versions, _loads, _load_failures, _load_bytes
    cdef public dict _phase_seconds, _evictions, _evicted_bytes, _worker_exits, _resent
    cdef public dict _late, _skipped, _scrapes

    @cython.locals(m=_ModelRequests, latency=_Histogram)
    cpdef _request(self, dict f)

    @cython.locals(v=_VersionRequests)
    cpdef _count_version(self, model, dict f, worker_ns)

    cpdef _ModelRequests _model(self, model)
    cpdef _VersionRequests _version(self, model, version)
