# Declares the TCP connection's protocol as an extension type where tcp.py
# is compiled (setup.py): its attributes are slots, and the methods each
# request calls from within it are C calls (see mmengine/workers.pxd).

from mmengine.server.listener cimport BudgetedReading


cdef class _Connection(BudgetedReading):
    cdef public object engine, loop, buf, idle, unsent, big
    cdef public dict tasks
    cdef public bint paused, write_blocked, closing, eof, lingering
    cdef public Py_ssize_t fd
    cdef public double frame_began
    cpdef _take_frames(self)
    cpdef _take(self, message)
    cpdef _infer(self, rid, model, inputs, version, timeout, token, timing, held=*)
    cpdef _track(self, fut, held)
    cpdef _give(self, held)
    cpdef _on_answer(self, rid, t_submit, model, fut)
    cpdef quiet(self)
    cpdef _answer(self, rid, t_submit, model, fut)
    cpdef _task_done(self, fut)
    cpdef _write(self, parts)
