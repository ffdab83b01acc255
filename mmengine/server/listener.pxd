# Declares the connections' common parts, and the listener, as extension
# types where listener.py is compiled (setup.py): their attributes are
# slots, not an instance dict's entries (see mmengine/workers.pxd). The
# source runs unchanged where it is not compiled.

cdef class WatchedWrites:
    cdef public object transport
    cdef public double last_active
    cdef public Py_ssize_t unsent_seen
    cdef object __weakref__


cdef class BudgetedReading(WatchedWrites):
    cdef public object server
    cdef public Py_ssize_t reserved, awaiting, paced_base
    cdef public double paced_from, served_since
    cdef public object ending


cdef class Listener:
    cdef public object engine, _factory, _server, connections, max_connections, refused
    cdef public object refusing
    cdef public object stopping, control_digests, receiving, _linger_ns, _linger_until
    cdef public object _lingering, _loop, _linger_backoff, _cpu_taken, lingers, port
    cdef object __weakref__
    cpdef linger(self, connection)
    cpdef _look(self, connection)
    cpdef _turn(self)
