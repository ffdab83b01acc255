"""The SDK's hot frames in C: an infer request packed, and its answer read
into arrays, as protocol.py's msgpack codec does them byte for byte
(tests/test_wire.py holds the two to each other).

Why: in a round trip the client's Python runs on caches that the server's
processes have just used, and there the SDK cost 60-70 us more than a
raw-socket client of the same server (benchmarks/RESULTS.md, session 31).
These do in one C call what took tens of Python-level steps.

Only the common case is done here: plain little-endian C-contiguous numpy
arrays of the wire's dtypes, smaller than protocol.BIG in all, and an
answer holding nothing but its id, ok and outputs. Anything else returns
None, and the caller takes protocol.py's path, which also says what is
wrong where something is.
"""
cimport cython
from cpython.buffer cimport (PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_CheckExact, PyDict_Next, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy

import numpy as np

from mmengine import protocol

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object, Py_ssize_t *) except NULL


cdef object _ndarray = np.ndarray
cdef Py_ssize_t _BIG = protocol.BIG
cdef dict _DTYPES = dict(protocol.DTYPES)  # name -> np.dtype

# -- packing ------------------------------------------------------------------

cdef struct Out:
    char *p
    Py_ssize_t n, cap
    char local[512]


cdef int _room(Out *o, Py_ssize_t more) except -1:
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


cdef inline int _put(Out *o, const void *data, Py_ssize_t size) except -1:
    _room(o, size)
    memcpy(o.p + o.n, data, size)
    o.n += size
    return 0


cdef inline int _byte(Out *o, uint8_t b) except -1:
    _room(o, 1)
    o.p[o.n] = <char>b
    o.n += 1
    return 0


cdef int _be(Out *o, uint8_t head, uint64_t v, int size) except -1:
    """`head`, then `v` big-endian in `size` bytes."""
    cdef int i
    _room(o, 1 + size)
    o.p[o.n] = <char>head
    for i in range(size):
        o.p[o.n + 1 + i] = <char>((v >> (8 * (size - 1 - i))) & 0xff)
    o.n += 1 + size
    return 0


cdef int _head(Out *o, Py_ssize_t n, uint8_t fix, Py_ssize_t fix_max,
               uint8_t h8, uint8_t h16, uint8_t h32) except -1:
    """A length header as msgpack writes the least one (h8 0: there is none)."""
    if n < fix_max:
        return _byte(o, fix | <uint8_t>n)
    if h8 and n < 0x100:
        return _be(o, h8, n, 1)
    if n < 0x10000:
        return _be(o, h16, n, 2)
    return _be(o, h32, n, 4)


cdef int _str(Out *o, str s) except -1:
    cdef Py_ssize_t size
    cdef const char *utf8 = PyUnicode_AsUTF8AndSize(s, &size)
    _head(o, size, 0xa0, 32, 0xd9, 0xda, 0xdb)
    return _put(o, utf8, size)


cdef int _int(Out *o, int64_t v) except -1:
    if v >= 0:
        if v < 0x80:
            return _byte(o, <uint8_t>v)
        if v < 0x100:
            return _be(o, 0xcc, v, 1)
        if v < 0x10000:
            return _be(o, 0xcd, v, 2)
        if v < 0x100000000:
            return _be(o, 0xce, v, 4)
        return _be(o, 0xcf, v, 8)
    if v >= -32:
        return _byte(o, <uint8_t>(v & 0xff))
    if v >= -0x80:
        return _be(o, 0xd0, <uint64_t>v, 1)
    if v >= -0x8000:
        return _be(o, 0xd1, <uint64_t>v, 2)
    if v >= -0x80000000:
        return _be(o, 0xd2, <uint64_t>v, 4)
    return _be(o, 0xd3, <uint64_t>v, 8)


cdef int _pyint(Out *o, object v) except -1:
    """0 if `v`, an exact int, is written; 1 if it is past int64 (left to
    msgpack: an uint64, or its error)."""
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow:
        return 1
    _int(o, n)
    return 0


cdef int _float(Out *o, double d) except -1:
    cdef uint64_t bits
    memcpy(&bits, &d, 8)
    return _be(o, 0xcb, bits, 8)


def _formats() -> dict:
    """The buffer format (bytes, as numpy exports a native-order array's)
    of each numpy type that has a wire dtype -> that dtype's name: int64 is
    "l" and "q" alike, and so on."""
    formats = {}
    for scalar in set(np.sctypeDict.values()):
        try:
            dtype = np.dtype(scalar)
            fmt = memoryview(np.zeros(0, dtype)).format.encode()
        except (TypeError, ValueError):  # no buffer: datetimes, objects, strings
            continue
        if dtype.name in protocol.DTYPES and dtype.isnative:
            formats[fmt] = dtype.name
    return formats


cdef dict _FORMATS = _formats()


cdef int _tensor(Out *o, object array, Py_ssize_t *total) except -1:
    """One tensor map ({"dtype", "shape", "data"}, encode_tensors' order);
    1 if `array` is none the fast path takes (nothing is written then:
    the caller drops the frame)."""
    cdef Py_buffer view
    cdef int i
    cdef str name
    if type(array) is not _ndarray:
        return 1
    try:
        PyObject_GetBuffer(array, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except (BufferError, TypeError, ValueError):  # not contiguous, or no buffer (objects)
        return 1
    try:
        name = _FORMATS.get(<bytes>view.format)
        if name is None:
            return 1
        total[0] += view.len
        if total[0] >= _BIG:  # frame_parts lays it out around the caller's memory
            return 1
        _byte(o, 0x83)
        _put(o, b"\xa5dtype", 6)
        _str(o, name)
        _put(o, b"\xa5shape", 6)
        _head(o, view.ndim, 0x90, 16, 0, 0xdc, 0xdd)
        for i in range(view.ndim):
            _int(o, view.shape[i])
        _put(o, b"\xa4data", 5)
        _head(o, view.len, 0, 0, 0xc4, 0xc5, 0xc6)
        _put(o, view.buf, view.len)
    finally:
        PyBuffer_Release(&view)
    return 0


def infer_frame(object rid, object model, object inputs, object version,
                object timeout, object token, bint timing, object client_token):
    """The frame (length prefix and body) that Client.infer sends for
    these, as protocol.frame packs _infer_message's map with the id and the
    client's token (`client_token`, where the call has none) added after;
    None where the fast path does not apply."""
    cdef Out o
    cdef Py_ssize_t pos = 0, total = 0, size
    cdef PyObject *key
    cdef PyObject *value
    cdef int fields, i
    o.p, o.n, o.cap = o.local, 4, sizeof(o.local)  # the length goes first, once known
    try:
        if not (PyUnicode_CheckExact(model) and PyDict_CheckExact(inputs) and inputs
                and PyLong_CheckExact(rid)):
            return None
        if version is not None and not PyLong_CheckExact(version):
            return None
        if timeout is not None and not PyFloat_CheckExact(timeout):
            return None
        if token is not None and not PyUnicode_CheckExact(token):
            return None
        if token is None and client_token is not None:
            if not PyUnicode_CheckExact(client_token):
                return None
        fields = 4 + (version is not None) + (timeout is not None) + timing + (
            token is not None or client_token is not None)
        _byte(&o, 0x80 | fields)
        _put(&o, b"\xa2op\xa5infer\xa5model", 15)
        _str(&o, model)
        _put(&o, b"\xa6inputs", 7)
        _head(&o, len(inputs), 0x80, 16, 0, 0xde, 0xdf)
        while PyDict_Next(inputs, &pos, &key, &value):
            if not PyUnicode_CheckExact(<object>key):
                return None
            _str(&o, <str>key)
            if _tensor(&o, <object>value, &total):
                return None
        if version is not None:
            _put(&o, b"\xa7version", 8)
            if _pyint(&o, version):
                return None
        if timeout is not None:
            _put(&o, b"\xa7timeout", 8)
            _float(&o, PyFloat_AS_DOUBLE(timeout))
        if token is not None:
            _put(&o, b"\xa5token", 6)
            _str(&o, token)
        if timing:
            _put(&o, b"\xa6timing\xc3", 8)
        _put(&o, b"\xa2id", 3)
        if _pyint(&o, rid):
            return None
        if token is None and client_token is not None:
            _put(&o, b"\xa5token", 6)
            _str(&o, client_token)
        size = o.n - 4
        for i in range(4):  # protocol.LENGTH: little-endian
            o.p[i] = <char>((size >> (8 * i)) & 0xff)
        return PyBytes_FromStringAndSize(o.p, o.n)
    except UnicodeEncodeError:  # a lone surrogate: msgpack's error, on its path
        return None
    finally:
        if o.p != o.local:
            PyMem_Free(o.p)


# -- unpacking ----------------------------------------------------------------

cdef struct In:
    const uint8_t *p
    Py_ssize_t n, at


cdef inline bint _has(In *r, Py_ssize_t size):
    return r.n - r.at >= size


cdef uint64_t _take_be(In *r, int size):
    cdef uint64_t v = 0
    cdef int i
    for i in range(size):
        v = (v << 8) | r.p[r.at + i]
    r.at += size
    return v


cdef Py_ssize_t _length(In *r, uint8_t fix, uint8_t fix_mask, uint8_t h8, uint8_t h16,
                        uint8_t h32):
    """The length a header of this kind says (and the header read); -1 if
    the next value is none of them, or is cut short."""
    cdef uint8_t b
    cdef int size
    if not _has(r, 1):
        return -1
    b = r.p[r.at]
    if fix_mask and (b & ~fix_mask) == fix:
        r.at += 1
        return b & fix_mask
    if h8 and b == h8:
        size = 1
    elif b == h16:
        size = 2
    elif b == h32:
        size = 4
    else:
        return -1
    if not _has(r, 1 + size):
        return -1
    r.at += 1
    return <Py_ssize_t>_take_be(r, size)


cdef inline Py_ssize_t _map(In *r):
    return _length(r, 0x80, 0x0f, 0, 0xde, 0xdf)


cdef inline Py_ssize_t _array(In *r):
    return _length(r, 0x90, 0x0f, 0, 0xdc, 0xdd)


cdef const char *_raw(In *r, Py_ssize_t *size, bint binary):
    """A str's (or, `binary`, a bin's) bytes in place; NULL if the next
    value is not one, or is cut short."""
    cdef Py_ssize_t n
    if binary:
        n = _length(r, 0, 0, 0xc4, 0xc5, 0xc6)
    else:
        n = _length(r, 0xa0, 0x1f, 0xd9, 0xda, 0xdb)
    if n < 0 or not _has(r, n):
        return NULL
    size[0] = n
    r.at += n
    return <const char *>(r.p + r.at - n)


cdef bint _key(In *r, const char *name, Py_ssize_t size):
    """Whether the next value is the str `name` (read if it is)."""
    cdef Py_ssize_t at = r.at, n
    cdef const char *s = _raw(r, &n, False)
    if s != NULL and n == size and memcmp(s, name, size) == 0:
        return True
    r.at = at
    return False


cdef int _uint(In *r, int64_t *v):
    """A msgpack int of 0..2**63-1 (0), or not one (-1)."""
    cdef uint8_t b
    cdef int size
    cdef uint64_t u
    if not _has(r, 1):
        return -1
    b = r.p[r.at]
    if b < 0x80:
        r.at += 1
        v[0] = b
        return 0
    if b == 0xcc:
        size = 1
    elif b == 0xcd:
        size = 2
    elif b == 0xce:
        size = 4
    elif b == 0xcf:
        size = 8
    else:
        return -1  # a negative one is no id or dimension of ours either
    if not _has(r, 1 + size):
        return -1
    r.at += 1
    u = _take_be(r, size)
    if u >> 63:
        return -1
    v[0] = <int64_t>u
    return 0


cdef object _array_of(In *r):
    """One output tensor's map as a read-only array of its own bytes, or
    None if it is anything but a well-formed tensor of the wire."""
    cdef Py_ssize_t entries = _map(r), n, size = 0, i, dims = -1, count = 1
    cdef const char *data = NULL
    cdef const char *s
    cdef object dtype = None
    cdef int64_t d
    cdef list shape = None
    cdef bytes copy
    if entries != 3:
        return None
    for i in range(3):
        if _key(r, "dtype", 5):
            s = _raw(r, &n, False)
            if s == NULL or dtype is not None:
                return None
            dtype = _DTYPES.get(PyUnicode_DecodeUTF8(s, n, NULL))
            if dtype is None:
                return None
        elif _key(r, "shape", 5):
            dims = _array(r)
            if dims < 0 or shape is not None:
                return None
            shape = []
            for _ in range(dims):
                if _uint(r, &d) < 0 or d >> 40:  # (no product to overflow)
                    return None
                shape.append(d)
                count *= d
        elif _key(r, "data", 4):
            if data != NULL:
                return None
            data = _raw(r, &size, True)
            if data == NULL:
                return None
        else:
            return None
    if dtype is None or shape is None or data == NULL:
        return None
    if size != count * (<object>dtype).itemsize:  # protocol's path says so
        return None
    if (<object>dtype).kind == "b":
        for i in range(size):
            if <uint8_t>data[i] > 1:  # protocol's path refuses it
                return None
    copy = PyBytes_FromStringAndSize(data, size)
    return _ndarray(shape, dtype, copy)


def answer(object buf, Py_ssize_t start, Py_ssize_t size, type outputs_type):
    """The answer to an infer in `buf[start:start + size]` (a frame's
    body), as {"id": int, "ok": True, "outputs": outputs_type({name:
    array})}, its arrays read-only and of bytes of their own; None unless it holds those three
    keys and no other, each well formed (protocol.py's path reads it then,
    or says what is wrong)."""
    cdef Py_buffer view
    cdef In r
    cdef Py_ssize_t entries, outputs, i, j, n
    cdef int64_t rid = 0
    cdef bint ok = False, has_id = False
    cdef object arrays = None
    cdef const char *s
    cdef object array, name
    PyObject_GetBuffer(buf, &view, 0)
    try:
        if start < 0 or size < 0 or start + size > view.len:
            return None
        r.p, r.n, r.at = <const uint8_t *>view.buf + start, size, 0
        entries = _map(&r)
        if entries != 3:
            return None
        for i in range(3):
            if _key(&r, "id", 2):
                if has_id or _uint(&r, &rid) < 0:
                    return None
                has_id = True
            elif _key(&r, "ok", 2):
                if ok or not _has(&r, 1) or r.p[r.at] != 0xc3:
                    return None
                r.at += 1
                ok = True
            elif _key(&r, "outputs", 7):
                outputs = _map(&r)
                if outputs < 0 or arrays is not None:
                    return None
                arrays = outputs_type()
                for j in range(outputs):
                    s = _raw(&r, &n, False)
                    if s == NULL:
                        return None
                    name = PyUnicode_DecodeUTF8(s, n, NULL)
                    array = _array_of(&r)
                    if array is None:
                        return None
                    PyDict_SetItem(arrays, name, array)
            else:
                return None
        if r.at != size or not has_id or not ok or arrays is None:
            return None
        return {"id": rid, "ok": True, "outputs": arrays}
    except UnicodeDecodeError:  # msgpack's error, on its path
        return None
    finally:
        PyBuffer_Release(&view)
