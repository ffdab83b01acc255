# Declares the request path's classes as extension types where workers.py
# is compiled (setup.py): their attributes are slots of a C struct, not
# entries of an instance dict that every access looks up, and the methods
# each request calls from within the module are C calls. (Attribute and
# method lookups were a quarter of the front-end's time on a tiny model's
# call.) The source runs unchanged where it is not compiled.

cimport cython

from mmengine.calltimes cimport CallTimes
from mmengine.ring cimport BackOff, CpuTaken


cdef class _Outlet:
    cdef public object ring, _worker, _outbox, _waiting, sent
    cpdef send(self, header, bufs, need=*, hold=*)
    cpdef _try_put(self, header, bufs, hold=*)


cdef class Worker:
    cdef public object index, device, req, ctl, resp, abandoned, _config, process, _pidfd
    cdef public object pid, alive, stopped_why, died_serving, died_loading, died_with
    cdef public object died_why, orphans, stuck, load_turns, loader_busy, ready, loop, _ids
    cdef public object _deadline_timer, _timer_at, _infer, _control, on_death, on_unserved
    cdef public object _poll_ns, _poll_until, _polling
    cdef public bint _released
    cdef public BackOff _poll_backoff
    cdef public CpuTaken _cpu_taken
    cdef public object _worker_backoffs, _spins, _inferring, _busy_from, _backlog_ns
    cdef public object _backoffs_seen, backoffs_before
    cdef public object _ring_ns, _began_ns, _room_timer, _room_at, _virtual_ns
    cdef public CallTimes _times
    cdef public object busy_ns, busy_share, _sampled
    cdef public dict _pending, _sent_ns, _finish_ns, _held, _calls
    cdef public set _held_ids, _loading, _quiet
    cdef public list _unbooked
    cdef public object _joined, sent_ns
    cdef object __weakref__
    cpdef call(self, op, model, version, arrays=*, params=*, on_done=*, deadline=*, then=*,
               batch=*, resendable=*, place=*)
    cpdef _inferences_done(self, n)
    @cython.locals(backoff=BackOff)
    cpdef _poll_answers(self)
    cpdef _ring_left_ns(self, now)
    cpdef _ring_has_room(self, now)
    cpdef _send_inference(self, rid, served, header, bufs, need=*, joins=*, hold=*)
    cpdef _on_readable(self)
    cpdef _poll(self)
    cpdef _drain(self)
    cpdef _on_response(self, parts)
    cpdef _book(self, on_done, served, seconds, t_read)
    cpdef _keep_books(self)


cpdef _finish(fut, on_done, result, then)
cpdef settle(fut, result, then)
