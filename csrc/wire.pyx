"""The TCP protocol's hot frames in C (protocol.native): an infer request
packed by the SDK and read by the front-end, its answer packed by the
front-end and read into arrays by the SDK, each byte for byte as
protocol.py's msgpack codec does it (tests/test_wire.py holds the two to
each other).

Why: in a round trip each process's Python runs on caches that the other
processes have just used, and there the SDK cost 60-70 us more than a
raw-socket client of the same server (benchmarks/RESULTS.md, session 31).
These do in one C call what took tens of Python-level steps.

Only the common case is done here: plain little-endian C-contiguous numpy
arrays of the wire's dtypes, smaller than protocol.BIG in all, an int id,
and no key but the request's or the answer's own. Anything else returns
None, and the caller takes protocol.py's path, which also says what is
wrong where something is.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.dict cimport PyDict_CheckExact, PyDict_Next, PyDict_SetItem
from cpython.exc cimport PyErr_CheckSignals
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.errno cimport EINTR, errno
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.string cimport memcmp, memcpy, strerror

cimport numpy as cnp
from arrays cimport MAX_DIMS, array_over, plain_type
from packing cimport (Out, be, byte, head, pack_float, pack_int, pack_pyint, pack_str, put,
                     release, start)
from unpacking cimport (In, has, read_array, read_int, read_key, read_map, read_raw, read_str,
                        take_be)

import numpy as np

cnp.import_array()

from mmengine import protocol

cdef Py_ssize_t _BIG = protocol.BIG
cdef dict _DTYPES = dict(protocol.DTYPES)  # name -> np.dtype

# -- packing ------------------------------------------------------------------

def _names() -> dict:
    """The numpy type number of each numpy type that has a wire dtype ->
    that dtype's name (int64's "l" and "q" alike)."""
    names = {}
    for scalar in set(np.sctypeDict.values()):
        dtype = np.dtype(scalar)
        if dtype.name in protocol.DTYPES and dtype.isnative:
            names[dtype.num] = dtype.name
    return names


cdef dict _NAMES = _names()


cdef int _tensor(Out *o, object array, Py_ssize_t *total) except -1:
    """One tensor map ({"dtype", "shape", "data"}, encode_tensors' order);
    1 if `array` is none the fast path takes (nothing is written then:
    the caller drops the frame)."""
    cdef int i
    cdef str name = _NAMES.get(plain_type(array))
    if name is None:
        return 1
    cdef cnp.ndarray a = <cnp.ndarray>array
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(a)
    total[0] += nbytes
    if total[0] >= _BIG:  # frame_parts lays it out around the caller's memory
        return 1
    byte(o, 0x83)
    put(o, b"\xa5dtype", 6)
    pack_str(o, name)
    put(o, b"\xa5shape", 6)
    head(o, cnp.PyArray_NDIM(a), 0x90, 16, 0, 0xdc, 0xdd)
    for i in range(cnp.PyArray_NDIM(a)):
        pack_int(o, cnp.PyArray_DIMS(a)[i])
    put(o, b"\xa4data", 5)
    head(o, nbytes, 0, 0, 0xc4, 0xc5, 0xc6)
    put(o, <const char *>cnp.PyArray_DATA(a), nbytes)
    return 0


cdef int _tensors(Out *o, dict arrays, Py_ssize_t *total) except -1:
    """A map of tensors by name; 1 if one of them is none the fast path
    takes (see _tensor)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *value
    head(o, len(arrays), 0x80, 16, 0, 0xde, 0xdf)
    while PyDict_Next(arrays, &pos, &key, &value):
        if not PyUnicode_CheckExact(<object>key):
            return 1
        pack_str(o, <str>key)
        if _tensor(o, <object>value, total):
            return 1
    return 0


cdef bytes _framed(Out *o):
    """The frame of what `o` holds after the 4 bytes left for its length."""
    cdef Py_ssize_t size = o.n - 4
    cdef int i
    for i in range(4):  # protocol.LENGTH: little-endian
        o.p[i] = <char>((size >> (8 * i)) & 0xff)
    return PyBytes_FromStringAndSize(o.p, o.n)


def infer_frame(object rid, object model, object inputs, object version,
                object timeout, object token, bint timing, object client_token):
    """The frame (length prefix and body) that Client.infer sends for
    these, as protocol.frame packs _infer_message's map with the id and the
    client's token (`client_token`, where the call has none) added after;
    None where the fast path does not apply."""
    cdef Out o
    cdef Py_ssize_t total = 0
    cdef int fields
    start(&o, 4)  # the length goes first, once known
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
        byte(&o, 0x80 | fields)
        put(&o, b"\xa2op\xa5infer\xa5model", 15)
        pack_str(&o, model)
        put(&o, b"\xa6inputs", 7)
        if _tensors(&o, inputs, &total):
            return None
        if version is not None:
            put(&o, b"\xa7version", 8)
            if pack_pyint(&o, version):
                return None
        if timeout is not None:
            put(&o, b"\xa7timeout", 8)
            pack_float(&o, PyFloat_AS_DOUBLE(timeout))
        if token is not None:
            put(&o, b"\xa5token", 6)
            pack_str(&o, token)
        if timing:
            put(&o, b"\xa6timing\xc3", 8)
        put(&o, b"\xa2id", 3)
        if pack_pyint(&o, rid):
            return None
        if token is None and client_token is not None:
            put(&o, b"\xa5token", 6)
            pack_str(&o, client_token)
        return _framed(&o)
    except UnicodeEncodeError:  # a lone surrogate: msgpack's error, on its path
        return None
    finally:
        release(&o)


# -- unpacking ----------------------------------------------------------------

cdef object _array_of(In *r):
    """One tensor's map as a read-only array of its own bytes (aligned for
    any dtype: a bytes object's data is), or None if it is anything but a
    well-formed tensor of the wire."""
    cdef Py_ssize_t entries = read_map(r), n, size = 0, i, j, dims = -1, count = 1, itemsize
    cdef const char *data = NULL
    cdef const char *s
    cdef object dtype = None
    cdef int64_t d
    cdef cnp.npy_intp shape[MAX_DIMS]
    cdef bytes copy
    if entries != 3:
        return None
    for i in range(3):
        if read_key(r, "dtype", 5):
            s = read_raw(r, &n, False)
            if s == NULL or dtype is not None:
                return None
            dtype = _DTYPES.get(PyUnicode_DecodeUTF8(s, n, NULL))
            if dtype is None:
                return None
        elif read_key(r, "shape", 5):
            if dims >= 0:
                return None
            dims = read_array(r)
            if dims < 0 or dims > MAX_DIMS:
                return None
            for j in range(dims):
                if read_int(r, &d, False) < 0:
                    return None
                shape[j] = d
                if count and d > PY_SSIZE_T_MAX // count:  # more than memory holds
                    return None
                count *= d
        elif read_key(r, "data", 4):
            if data != NULL:
                return None
            data = read_raw(r, &size, True)
            if data == NULL:
                return None
        else:
            return None
    if dtype is None or dims < 0 or data == NULL:
        return None
    itemsize = (<cnp.dtype>dtype).itemsize
    if size % itemsize or size // itemsize != count:  # protocol's path says so
        return None
    if (<cnp.dtype>dtype).kind == c'b':
        for i in range(size):
            if <uint8_t>data[i] > 1:  # protocol's path refuses it
                return None
    copy = PyBytes_FromStringAndSize(data, size)
    try:
        return array_over(dtype, dims, shape, PyBytes_AS_STRING(copy), copy, False)
    except ValueError:  # no size numpy takes ([0, 2**62, 2**62]): protocol.py says so
        return None


cdef object _arrays(In *r, object arrays):
    """A map of tensors by name read into `arrays` (a dict, or a subclass),
    which it returns; None if it is anything but such a map."""
    cdef Py_ssize_t entries = read_map(r), i, n
    cdef const char *s
    cdef object array
    if entries < 0:
        return None
    for i in range(entries):
        s = read_raw(r, &n, False)
        if s == NULL:
            return None
        array = _array_of(r)
        if array is None:
            return None
        PyDict_SetItem(arrays, PyUnicode_DecodeUTF8(s, n, NULL), array)
    return arrays


cdef class _Body:
    """A frame body in `buf[start:start + size]`, its bytes held while read."""
    cdef Py_buffer view
    cdef In r

    def __cinit__(self, object buf, Py_ssize_t start, Py_ssize_t size):
        PyObject_GetBuffer(buf, &self.view, 0)
        if start < 0 or size < 0 or start + size > self.view.len:
            start, size = 0, 0  # no body: reads as nothing
        self.r.p = <const uint8_t *>self.view.buf + start
        self.r.n, self.r.at = size, 0

    def __dealloc__(self):
        PyBuffer_Release(&self.view)


def answer(object buf, Py_ssize_t start, Py_ssize_t size, type outputs_type):
    """The answer to an infer in `buf[start:start + size]` (a frame's
    body), as {"id": int, "ok": True, "outputs": outputs_type({name:
    array})}, its arrays read-only and of bytes of their own; None unless
    it holds those three keys and no other, each well formed (protocol.py's
    path reads it then, or says what is wrong)."""
    cdef _Body body = _Body(buf, start, size)
    cdef In *r = &body.r
    cdef int64_t rid = 0
    cdef bint ok = False, has_id = False
    cdef object arrays = None
    if read_map(r) != 3:
        return None
    try:
        for _ in range(3):
            if read_key(r, "id", 2):
                if has_id or read_int(r, &rid, False) < 0:
                    return None
                has_id = True
            elif read_key(r, "ok", 2):
                if ok or not has(r, 1) or r.p[r.at] != 0xc3:
                    return None
                r.at += 1
                ok = True
            elif read_key(r, "outputs", 7):
                if arrays is not None:
                    return None
                arrays = _arrays(r, outputs_type())
                if arrays is None:
                    return None
            else:
                return None
    except UnicodeDecodeError:  # msgpack's error, on its path
        return None
    if r.at != r.n or not has_id or not ok:
        return None
    return {"id": rid, "ok": True, "outputs": arrays}


# A request's keys, as bits: each may come once.
cdef enum:
    ID = 1
    OP = 2
    MODEL = 4
    INPUTS = 8
    VERSION = 16
    TIMEOUT = 32
    TOKEN = 64
    TIMING = 128
    NEEDED = ID | OP | MODEL | INPUTS


def request(object buf, Py_ssize_t start, Py_ssize_t size):
    """An infer request in `buf[start:start + size]` (a frame's body) as
    (id, model, inputs, version, timeout, token, timing), as server/tcp.py
    reads one through protocol.py: its inputs a dict of read-only arrays of
    bytes of their own; absent keys None (timing False). None unless its
    keys are the request's (docs/protocol.md), each once and well formed,
    with a non-negative int id, at least one input, a float timeout above
    0 and no nil (protocol.py's path reads it then, or says what is
    wrong)."""
    cdef _Body body = _Body(buf, start, size)
    cdef In *r = &body.r
    cdef Py_ssize_t entries = read_map(r), n
    cdef int64_t rid = 0, version = 0
    cdef int seen = 0, bit
    cdef uint64_t bits
    cdef double timeout = 0
    cdef const char *s
    cdef object model = None, inputs = None, token = None
    cdef bint timing = False
    if entries < 0 or body.r.n >= _BIG:  # a large one has tcp.py's own limits
        return None
    try:
        for _ in range(entries):
            if read_key(r, "id", 2):
                bit = ID
                if read_int(r, &rid, False) < 0:
                    return None
            elif read_key(r, "op", 2):
                bit = OP
                s = read_raw(r, &n, False)
                if s == NULL or n != 5 or memcmp(s, b"infer", 5) != 0:
                    return None
            elif read_key(r, "model", 5):
                bit = MODEL
                model = read_str(r)
                if model is None:
                    return None
            elif read_key(r, "inputs", 6):
                bit = INPUTS
                inputs = _arrays(r, {})
                if not inputs:
                    return None
            elif read_key(r, "version", 7):
                bit = VERSION
                if read_int(r, &version, True) < 0:
                    return None
            elif read_key(r, "timeout", 7):
                bit = TIMEOUT
                if not has(r, 9) or r.p[r.at] != 0xcb:
                    return None
                r.at += 1
                bits = take_be(r, 8)
                memcpy(&timeout, &bits, 8)
                if not timeout > 0:  # NaN is not either
                    return None
            elif read_key(r, "token", 5):
                bit = TOKEN
                token = read_str(r)
                if token is None:
                    return None
            elif read_key(r, "timing", 6):
                bit = TIMING
                if not has(r, 1) or r.p[r.at] not in (0xc2, 0xc3):
                    return None
                timing = r.p[r.at] == 0xc3
                r.at += 1
            else:
                return None
            if seen & bit:
                return None
            seen |= bit
    except UnicodeDecodeError:  # msgpack's error, on its path
        return None
    if r.at != r.n or seen & NEEDED != NEEDED:
        return None
    return (rid, model, inputs, version if seen & VERSION else None,
            timeout if seen & TIMEOUT else None, token, timing)


def answer_frame(object rid, object outputs):
    """The frame (length prefix and body) of infer `rid`'s answer of
    `outputs` (name -> array) as server/tcp.py sends it through
    protocol.py, or None where the fast path does not apply (see
    infer_frame)."""
    cdef Out o
    cdef Py_ssize_t pos = 0, total = 0
    cdef PyObject *key
    cdef PyObject *value
    start(&o, 4)
    try:
        if not (PyLong_CheckExact(rid) and PyDict_CheckExact(outputs)):
            return None
        put(&o, b"\x83\xa2id", 4)
        if pack_pyint(&o, rid):
            return None
        put(&o, b"\xa2ok\xc3\xa7outputs", 12)
        if _tensors(&o, outputs, &total):
            return None
        return _framed(&o)
    except UnicodeEncodeError:  # a lone surrogate: msgpack's error, on its path
        return None
    finally:
        release(&o)


# -- the blocking client's exchange -----------------------------------------------

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN


cdef int _raise_errno(int err) except -1:
    """The socket module's error for `err` (OSError's subclass by errno);
    after EINTR, whatever a signal's handler raised (0 if none did)."""
    if err == EINTR:
        return PyErr_CheckSignals()
    raise OSError(err, strerror(err).decode())


def readable(int fd):
    """Whether socket `fd` has bytes to read or its peer closed it, looked
    at without waiting: select.poll()'s poll(0) with no object between."""
    cdef pollfd p
    cdef int n
    p.fd, p.events, p.revents = fd, POLLIN, 0
    while True:
        n = poll(&p, 1, 0)  # with the GIL: it does not wait
        if n >= 0:
            return n > 0
        _raise_errno(errno)


def exchange(int fd, object frame, bytearray inbox not None):
    """Sends all of `frame` on blocking socket `fd`, then reads what has
    come, up to len(inbox) bytes, through `inbox`: as sock.sendall(frame)
    then sock.recv(len(inbox)) do, errors and signals alike, with no
    socket object between (one round trip's Python, on caches the server
    just used, costs more than its system calls)."""
    cdef Py_buffer out, into
    cdef ssize_t n, sent = 0
    cdef int err
    PyObject_GetBuffer(frame, &out, PyBUF_SIMPLE)
    try:
        while sent < out.len:
            with nogil:
                n = send(fd, <char *>out.buf + sent, out.len - sent, 0)
                err = errno
            if n < 0:
                _raise_errno(err)
            else:
                sent += n
                if sent < out.len:  # cut short by a signal: its handler runs, as sendall's
                    PyErr_CheckSignals()
    finally:
        PyBuffer_Release(&out)
    PyObject_GetBuffer(inbox, &into, PyBUF_WRITABLE)  # (held: no resize while it reads)
    try:
        while True:
            with nogil:
                n = recv(fd, into.buf, into.len, 0)
                err = errno
            if n >= 0:
                return PyBytes_FromStringAndSize(<char *>into.buf, n)
            _raise_errno(err)
    finally:
        PyBuffer_Release(&into)
