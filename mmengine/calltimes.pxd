# CallTimes as an extension type where calltimes.py is compiled (setup.py):
# each request reads and renews it, in the front-end and in its worker
# (see mmengine/workers.pxd). The source runs unchanged where it is not
# compiled.

cdef class CallTimes:
    cdef public dict _calls
    cpdef ran(self, key, seconds, now)
    cpdef would_miss(self, key, deadline, now)
    cpdef expected(self, key)
