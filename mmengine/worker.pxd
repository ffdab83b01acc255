# Declares the worker's serving path as extension types and C functions
# where worker.py is compiled (setup.py): every step between a request's
# read from the ring and its answer's write is on its client's round trip
# (see mmengine/workers.pxd). The source runs unchanged where it is not
# compiled.

from mmengine.calltimes cimport CallTimes


cdef class WorkerLogic:
    cdef public object _torch, device, models, batching, _manifests, _stream, serving
    cdef public object loader_op, readers, _views_of, retired
    cdef public CallTimes times
    cpdef loader_state(self)
    cpdef ran(self, key, seconds, now)
    cpdef noted(self, key, ran)
    cpdef would_miss(self, key, deadline, queued)
    cpdef infer(self, name, version, inputs)


cdef class _Responder:
    cdef public object _ring, _lock
    cpdef send(self, rid, code=*, body=*, outputs=*, model=*)
    cpdef fail(self, rid, e, ran=*)


# Typed where each is always given: their methods are C calls too.
cpdef _serve_requests(req, _Responder out, WorkerLogic logic, abandoned, clock)
cpdef _parse(parts, _Responder out)
cpdef _skips(rid, key, params, queued, WorkerLogic logic, abandoned)
cpdef _begins(rid, key, params, queued, WorkerLogic logic, abandoned, _Responder out,
              skipped=*)
cpdef _serve_one(woke, _Responder out, WorkerLogic logic, abandoned, clock, request)
cpdef _call(woke, WorkerLogic logic, abandoned, clock, name, version, inputs, batch=*)
cpdef _run(woke, _Responder out, WorkerLogic logic, abandoned, clock, name, version, inputs,
           rid, failed_call=*)
