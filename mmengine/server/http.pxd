# Declares the HTTP connection's protocol as an extension type where http.py
# is compiled (setup.py), as tcp.pxd does the TCP one: its attributes are
# slots, not an instance dict's entries, on every request's path (the
# parser's callbacks read and set them per header and per body chunk).

from mmengine.server.listener cimport BudgetedReading


cdef class _HttpConnection(BudgetedReading):
    cdef public object parser, queue, answering, idle, url, headers, body, refused, doomed
    cdef public bint dead, eof, pipeline_full, write_blocked, in_head, continue_owed, upgrade
    cdef public bint head_begun
    cdef public Py_ssize_t fd, head_raw, header_bytes, body_bytes, queued_bytes
    cdef public double began
    cpdef _reset(self)
    cpdef _touch(self)
    cpdef _count_header(self, n)
    cpdef _kick(self)
    cpdef _start(self, request)
    cpdef _respond(self, request, response)
    cpdef quiet(self)
