# msgpack written into a growing C buffer, the least encoding of each value
# as msgpack's Packer(use_bin_type=True) chooses it: the packing steps that
# wire.pyx (the TCP frames) and records.pyx (the ring records) share.
# Inline, so each module that cimports them compiles its own copy.
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL
    long long PyLong_AsLongLongAndOverflow(object, int *) except? -1


cdef struct Out:
    char *p
    Py_ssize_t n, cap
    char local[512]


cdef inline void start(Out *o, Py_ssize_t n):
    """`o` empty, in its own local bytes, with `n` bytes left for a prefix."""
    o.p, o.n, o.cap = o.local, n, sizeof(o.local)


cdef inline void release(Out *o):
    if o.p != o.local:
        PyMem_Free(o.p)


cdef inline int room(Out *o, Py_ssize_t more) except -1:
    cdef Py_ssize_t cap
    cdef char *p
    if o.n + more <= o.cap:
        return 0
    cap = max(2 * o.cap, o.n + more)
    if o.p == o.local:
        p = <char *>PyMem_Malloc(cap)
        if p != NULL:
            memcpy(p, o.local, o.n)
    else:
        p = <char *>PyMem_Realloc(o.p, cap)
    if p == NULL:
        raise MemoryError()
    o.p, o.cap = p, cap
    return 0


cdef inline int put(Out *o, const void *data, Py_ssize_t size) except -1:
    room(o, size)
    memcpy(o.p + o.n, data, size)
    o.n += size
    return 0


cdef inline int byte(Out *o, uint8_t b) except -1:
    room(o, 1)
    o.p[o.n] = <char>b
    o.n += 1
    return 0


cdef inline int be(Out *o, uint8_t head, uint64_t v, int size) except -1:
    """`head`, then `v` big-endian in `size` bytes."""
    cdef int i
    room(o, 1 + size)
    o.p[o.n] = <char>head
    for i in range(size):
        o.p[o.n + 1 + i] = <char>((v >> (8 * (size - 1 - i))) & 0xff)
    o.n += 1 + size
    return 0


cdef inline int head(Out *o, Py_ssize_t n, uint8_t fix, Py_ssize_t fix_max,
                     uint8_t h8, uint8_t h16, uint8_t h32) except -1:
    """A length header as msgpack writes the least one (h8 0: there is none)."""
    if n < fix_max:
        return byte(o, fix | <uint8_t>n)
    if h8 and n < 0x100:
        return be(o, h8, n, 1)
    if n < 0x10000:
        return be(o, h16, n, 2)
    return be(o, h32, n, 4)


cdef inline int pack_str(Out *o, str s) except -1:
    cdef Py_ssize_t size
    cdef const char *utf8 = PyUnicode_AsUTF8AndSize(s, &size)
    head(o, size, 0xa0, 32, 0xd9, 0xda, 0xdb)
    return put(o, utf8, size)


cdef inline int pack_int(Out *o, int64_t v) except -1:
    if v >= 0:
        if v < 0x80:
            return byte(o, <uint8_t>v)
        if v < 0x100:
            return be(o, 0xcc, v, 1)
        if v < 0x10000:
            return be(o, 0xcd, v, 2)
        if v < 0x100000000:
            return be(o, 0xce, v, 4)
        return be(o, 0xcf, v, 8)
    if v >= -32:
        return byte(o, <uint8_t>(v & 0xff))
    if v >= -0x80:
        return be(o, 0xd0, <uint64_t>v, 1)
    if v >= -0x8000:
        return be(o, 0xd1, <uint64_t>v, 2)
    if v >= -0x80000000:
        return be(o, 0xd2, <uint64_t>v, 4)
    return be(o, 0xd3, <uint64_t>v, 8)


cdef inline int pack_pyint(Out *o, object v) except -1:
    """0 if `v`, an exact int, is written; 1 if it is past int64 (left to
    msgpack: an uint64, or its error)."""
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        return 1
    pack_int(o, n)
    return 0


cdef inline int pack_float(Out *o, double d) except -1:
    cdef uint64_t bits
    memcpy(&bits, &d, 8)
    return be(o, 0xcb, bits, 8)
