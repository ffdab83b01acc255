# Declares the blocking client's classes as extension types where
# client.py is compiled (setup.py): their attributes are slots, and the
# methods a call runs through are C calls (see mmengine/workers.pxd). A
# client's every call is on its caller's round trip. The source runs
# unchanged where it is not compiled.

cdef class _Frames:
    cdef public object buf, big, arrays
    cpdef whole(self, data)


cdef class _Connection:
    cdef public object sock, timeout, frames, moved, wait, deadline, closes, sent, heard, ends
    cdef public int fd
    cdef public bytearray inbox
    cpdef alive(self)
    cpdef set_timeout(self, timeout)
    cpdef exchange_one(self, frame, rid)
    cpdef _begin(self)


cdef class Client:
    cdef public object address, timeout, token, pool_size, _pool, _closes, _ids, _max_frame
    cdef object __weakref__
    cpdef _borrow(self, wait)
    cpdef _give_back(self, conn)
    cpdef _exchange(self, frames, ids, wait, arrays=*)
