# Declares the request path's classes as extension types where engine.py
# is compiled (setup.py), as workers.pxd does the workers'. The source runs
# unchanged where it is not compiled.

cimport cython

from mmengine.workers cimport Worker


cdef class Engine:
    cdef public object _abandoning, _busy, _closing, _control_order, _copy_goes
    cdef public object _derived_inputs, _fetchers, _fetching, _forgotten, _gens, _handed
    cdef public object _hits, _load_gate, _load_waiters, _loaded_since_scan, _locks, _loop
    cdef public object _misses, _name_changes, _observe_timer, _publishing, _refused
    cdef public object _released, _relieving, _requests, _resolving, _rewarm_after, _rewarming, _room
    cdef public object _room_version, _room_waiters, _short_of_room, _shrinking, _started
    cdef public object _starting, _stats, _stopped, _stopping, _tasks, _used_since, _warmed
    cdef public object _cut_off
    cdef public object _warming, cache, config, disk, host, observers, pool, repo, servers
    cdef public dict _specs, _bad_specs, _gen, _pinned, _draining, _loaded_specs, _stale
    cdef public dict _queued
    cdef public list _unobserved
    cdef object __weakref__
    cpdef _submit(self, name, inputs, version, timeout, token, then, t_submit)
    cpdef _send_infer(self, key, Worker worker, arrays, deadline, then=*, resendable=*,
                      place=*)
    cpdef flush_observations(self)
    cpdef _observe_later(self, place, fut)
    cpdef _dequeue(self, name)
    @cython.locals(fields=dict)
    cpdef _emit_request(self, name, version, t_submit, fut, end_ns=*, sent=*)
    cpdef _looked_up(self, name, version)
    cpdef _emit(self, kind, fields)
    cpdef _deadline(self, timeout)
    cpdef _check_open(self)
    cpdef _check_loop(self)
    cpdef _unpin_request(self, key, gen, ran=*)
    cpdef _room_changed(self)
    cpdef _has_entry(self, key, gen)


cdef class _Place:
    cdef public object engine, name, version, t_submit, then, left, sent
    cpdef leave(self, fut=*)


cpdef dict _add_ran(dict fields, dict ran)
cpdef dict _request_fields(name, version, t_submit, e, end_ns=*)
