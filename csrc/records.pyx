"""The ring records' hot steps in C (messages.native): a record's header
packed with its tensors' descriptors, a header read, and tensors viewed or
copied out of a record, each as messages.py does it, byte for byte, value
for value and array for array (tests/test_records.py holds the two to each
other).

Why: a request crosses the rings twice, and each crossing ran
messages.py's describe, msgpack's packer, frombuffer and reshape on the
Python level, ~2 us a step warm and several times that cold; these are one
C call each.

Only the common case is done here: exact dicts, lists, strs, ints of
int64, floats, bytes, bools and None in a header (read: any msgpack but an
extension type); C-contiguous exact numpy
arrays of a numeric dtype in native order, at least one dimension, fewer
than a record has parts. Anything else returns None, and the caller takes
messages.py's path, which also says what is wrong where something is.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.dict cimport PyDict_CheckExact, PyDict_Copy, PyDict_Next, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport (PyList_AsTuple, PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE,
                           PyList_New, PyList_SET_ITEM)
from cpython.long cimport PyLong_AsSsize_t, PyLong_CheckExact
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.object cimport PyObject
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_CheckExact
from cpython.unicode cimport PyUnicode_CheckExact, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cimport numpy as cnp
from arrays cimport MAX_DIMS, array_over, plain_type
from packing cimport (Out, byte, head, pack_float, pack_int, pack_pyint, pack_str, put, release,
                      start)
from unpacking cimport In, has, read_any_int, read_array, read_map, read_raw, take_be

import numpy as np

cnp.import_array()


from mmengine.ring import MAX_PARTS

cdef int _DEPTH = 32  # deeper headers are left to msgpack (none of ours is)


def _dtypes():
    """({numpy type number: the dtype's str packed as msgpack}, {dtype
    str: np.dtype}) for the numeric dtypes in native order: an array's
    type number names its dtype without an attribute lookup (the "l" and
    "q" of int64 alike)."""
    packed, dtypes = {}, {}
    for scalar in set(np.sctypeDict.values()):
        dtype = np.dtype(scalar)
        if dtype.kind not in "biufc" or not dtype.isnative:
            continue
        packed[dtype.num] = bytes([0xa0 | len(dtype.str)]) + dtype.str.encode()
        dtypes[dtype.str] = dtype
    return packed, dtypes


cdef dict _PACKED_DTYPES
cdef dict _DTYPES
_PACKED_DTYPES, _DTYPES = _dtypes()


cdef object _packed_dtype(object value):
    """The packed dtype str of `value` where it is an array the fast path
    takes (plain_type) of a numeric dtype; else None."""
    return _PACKED_DTYPES.get(plain_type(value))


def plain_arrays(object inputs):
    """A copy of `inputs` where it is a non-empty dict of str to arrays
    the fast path takes (_packed_dtype, 0-d ones too), which Engine's
    inputs keep as they are; None for anything else (its way says what)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *value
    if not PyDict_CheckExact(inputs) or not inputs:
        return None
    while PyDict_Next(inputs, &pos, &key, &value):
        if not PyUnicode_CheckExact(<object>key) or _packed_dtype(<object>value) is None:
            return None
    return PyDict_Copy(inputs)


# -- packing ------------------------------------------------------------------

cdef int _value(Out *o, object v, int depth) except -1:
    """`v` as msgpack's Packer(use_bin_type=True) packs it; 1 if it is
    anything the fast path leaves to msgpack (nothing useful is written
    then: the caller drops the header)."""
    cdef Py_ssize_t pos = 0, i, n
    cdef PyObject *key
    cdef PyObject *value
    if depth > _DEPTH:
        return 1
    if v is None:
        return byte(o, 0xc0)
    if v is True:
        return byte(o, 0xc3)
    if v is False:
        return byte(o, 0xc2)
    if PyLong_CheckExact(v):
        return pack_pyint(o, v)
    if PyFloat_CheckExact(v):
        return pack_float(o, PyFloat_AS_DOUBLE(v))
    if PyUnicode_CheckExact(v):
        return pack_str(o, <str>v)
    if PyBytes_CheckExact(v):
        n = PyBytes_GET_SIZE(v)
        head(o, n, 0, 0, 0xc4, 0xc5, 0xc6)
        return put(o, PyBytes_AS_STRING(v), n)
    if PyDict_CheckExact(v):
        head(o, len(<dict>v), 0x80, 16, 0, 0xde, 0xdf)
        while PyDict_Next(v, &pos, &key, &value):
            if _value(o, <object>key, depth + 1) or _value(o, <object>value, depth + 1):
                return 1
        return 0
    if PyList_CheckExact(v) or PyTuple_CheckExact(v):
        n = PySequence_Fast_GET_SIZE(v)
        head(o, n, 0x90, 16, 0, 0xdc, 0xdd)
        for i in range(n):
            if _value(o, <object>PySequence_Fast_GET_ITEM(v, i), depth + 1):
                return 1
        return 0
    return 1


cdef int _tensors(Out *o, object arrays, list bufs) except -1:
    """messages.describe's descriptors of `arrays` ([[name, dtype.str,
    shape], ...]), each array appended to `bufs`; 1 if one of them is
    none the fast path takes (see the module's docstring)."""
    cdef Py_ssize_t pos = 0
    cdef PyObject *key
    cdef PyObject *value
    cdef object packed
    cdef cnp.ndarray a
    cdef int i
    if arrays is None:
        return byte(o, 0x90)
    if not PyDict_CheckExact(arrays) or len(<dict>arrays) >= MAX_PARTS:  # the header is a part
        return 1
    head(o, len(<dict>arrays), 0x90, 16, 0, 0xdc, 0xdd)
    while PyDict_Next(arrays, &pos, &key, &value):
        if not PyUnicode_CheckExact(<object>key):
            return 1
        packed = _packed_dtype(<object>value)
        if packed is None:
            return 1
        a = <cnp.ndarray>value
        if cnp.PyArray_NDIM(a) == 0:  # describe reshapes a 0-d array
            return 1
        byte(o, 0x93)
        pack_str(o, <str>key)
        put(o, PyBytes_AS_STRING(packed), PyBytes_GET_SIZE(packed))
        head(o, cnp.PyArray_NDIM(a), 0x90, 16, 0, 0xdc, 0xdd)
        for i in range(cnp.PyArray_NDIM(a)):
            pack_int(o, cnp.PyArray_DIMS(a)[i])
        bufs.append(<object>value)
    return 0


cdef object _record(tuple before, object arrays, tuple after):
    """(header, buffers): the header an array of `before`, the descriptors
    of `arrays` and `after`; None where the fast path does not apply."""
    cdef Out o
    cdef list bufs = []
    start(&o, 0)
    try:
        head(&o, len(before) + 1 + len(after), 0x90, 16, 0, 0xdc, 0xdd)
        for value in before:
            if _value(&o, value, 1):
                return None
        if _tensors(&o, arrays, bufs):
            return None
        for value in after:
            if _value(&o, value, 1):
                return None
        return PyBytes_FromStringAndSize(o.p, o.n), bufs
    except UnicodeEncodeError:  # a lone surrogate: msgpack's error, on its path
        return None
    finally:
        release(&o)


def request_record(object op, object rid, object model, object version, object arrays,
                   object params):
    """(header, buffers) as messages.request_record makes them, or None
    where the fast path does not apply."""
    return _record((int(op), rid, model, version), arrays, (params if params else {},))


def response_record(object rid, object code, object body, object arrays):
    """(header, buffers) as messages.response_record makes them, or None
    where the fast path does not apply."""
    return _record((rid, int(code), body), arrays, ())


# -- reading ------------------------------------------------------------------

cdef object _shape(object desc, Py_ssize_t *nbytes, cnp.npy_intp *dims, int *nd):
    """(name, dtype) of a descriptor [name, dtype, shape] whose dtype is
    one the fast path takes, its shape in dims[:nd] and its bytes in
    `nbytes`; None for anything else (a packed record's descriptors among
    them)."""
    cdef object name, dtype, shape, d
    cdef Py_ssize_t i, n, count = 1, itemsize
    if not PyList_CheckExact(desc) or PyList_GET_SIZE(desc) != 3:
        return None
    name = <object>PyList_GET_ITEM(desc, 0)
    dtype = <object>PyList_GET_ITEM(desc, 1)
    shape = <object>PyList_GET_ITEM(desc, 2)
    if not (PyUnicode_CheckExact(name) and PyUnicode_CheckExact(dtype)
            and PyList_CheckExact(shape)):
        return None
    dtype = _DTYPES.get(dtype)
    if dtype is None or PyList_GET_SIZE(shape) > MAX_DIMS:
        return None
    nd[0] = PyList_GET_SIZE(shape)
    for i in range(nd[0]):
        d = <object>PyList_GET_ITEM(shape, i)
        if not PyLong_CheckExact(d):
            return None
        try:
            n = PyLong_AsSsize_t(d)
        except OverflowError:
            return None
        if n < 0 or (n and count > PY_SSIZE_T_MAX // n):  # -1 and past memory: numpy's path
            return None
        dims[i] = n
        count *= n
    itemsize = (<cnp.dtype>dtype).itemsize
    if count > PY_SSIZE_T_MAX // itemsize:
        return None
    nbytes[0] = count * itemsize
    return name, dtype


cdef object _read(object descs, object parts, bint copy):
    """Arrays of the parts, each viewing its part as np.frombuffer would
    (`copy`: a copy of its own, as a.copy()): writable where the part is."""
    cdef dict out = {}
    cdef Py_ssize_t i, n, nbytes = 0
    cdef object described, part, owner
    cdef Py_buffer src
    cdef cnp.npy_intp dims[MAX_DIMS]
    cdef int nd = 0
    if not (PyList_CheckExact(descs) and PyList_CheckExact(parts)):
        return None
    n = PyList_GET_SIZE(descs)
    if PyList_GET_SIZE(parts) != n:
        return None
    for i in range(n):
        described = _shape(<object>PyList_GET_ITEM(descs, i), &nbytes, dims, &nd)
        if described is None:
            return None
        part = <object>PyList_GET_ITEM(parts, i)
        try:
            PyObject_GetBuffer(part, &src, PyBUF_SIMPLE)
        except (BufferError, TypeError):  # it exports none: messages.py's path says so
            return None
        try:
            if src.len != nbytes:  # frombuffer or reshape refuse it, on messages.py's path
                return None
            try:
                if copy:  # an array of its own, as a.copy() is: its base None
                    array = array_over(described[1], nd, dims, NULL, None, True)
                    memcpy(cnp.PyArray_DATA(array), src.buf, nbytes)
                else:  # as frombuffer's: its base holds an export of the memory (a
                    # ring's mapping stays mapped, a bytearray keeps its size)
                    owner = part if PyBytes_CheckExact(part) else PyMemoryView_FromObject(part)
                    array = array_over(described[1], nd, dims, <char *>src.buf, owner,
                                       not src.readonly)
            except ValueError:  # a shape numpy refuses: messages.py's path says it, typed
                return None
        finally:
            PyBuffer_Release(&src)
        PyDict_SetItem(out, described[0], array)
    return out


def view(object descs, object parts):
    """messages.view's arrays, or None where the fast path does not apply."""
    return _read(descs, parts, False)


def copy_out(object descs, object parts):
    """messages.copy_out's arrays, or None where the fast path does not apply."""
    return _read(descs, parts, True)


# -- headers ------------------------------------------------------------------

cdef object _NOT = object()  # what _unpacked leaves to msgpack


cdef object _unpacked(In *r, int depth):
    """The next value as messages._unpackb reads it (msgpack's unpackb,
    raw=False, strict_map_key=False); _NOT for an extension type, a value
    cut short, or one deeper than _DEPTH. A str that is no UTF-8, or a
    map's key that hashes not, raises msgpack's error."""
    cdef uint8_t b
    cdef int signed
    cdef Py_ssize_t n, i
    cdef const char *s
    cdef uint64_t u
    cdef uint32_t u32
    cdef float f
    cdef double d
    cdef object value, key, out
    if depth > _DEPTH or not has(r, 1):
        return _NOT
    signed = read_any_int(r, &u)
    if signed == 1:
        return <int64_t>u
    if signed == 0:
        return u
    b = r.p[r.at]
    if b == 0xc0 or b == 0xc2 or b == 0xc3:
        r.at += 1
        return None if b == 0xc0 else b == 0xc3
    if b == 0xca or b == 0xcb:
        n = 4 if b == 0xca else 8
        if not has(r, 1 + n):
            return _NOT
        r.at += 1
        u = take_be(r, n)
        if n == 4:
            u32 = <uint32_t>u
            memcpy(&f, &u32, 4)
            return <double>f
        memcpy(&d, &u, 8)
        return d
    s = read_raw(r, &n, False)
    if s != NULL:
        return PyUnicode_DecodeUTF8(s, n, NULL)
    s = read_raw(r, &n, True)
    if s != NULL:
        return PyBytes_FromStringAndSize(s, n)
    n = read_array(r)
    if n >= 0:
        if not has(r, n):  # each value takes a byte at least: cut short
            return _NOT
        out = PyList_New(n)
        for i in range(n):
            value = _unpacked(r, depth + 1)
            if value is _NOT:
                return _NOT
            Py_INCREF(value)
            PyList_SET_ITEM(out, i, value)
        return out
    n = read_map(r)
    if n >= 0:
        if not has(r, 2 * n):
            return _NOT
        out = {}
        for i in range(n):
            key = _unpacked(r, depth + 1)
            if key is _NOT:
                return _NOT
            value = _unpacked(r, depth + 1)
            if value is _NOT:
                return _NOT
            PyDict_SetItem(out, key, value)
        return out
    return _NOT  # an extension type, or no msgpack at all


cdef object _header(object header, Py_ssize_t fields):
    """The array of `fields` values that `header` (bytes, or a record's
    part) holds and nothing after it, as a tuple; None where the fast path
    does not read it."""
    cdef Py_buffer view
    cdef In r
    cdef object value
    PyObject_GetBuffer(header, &view, PyBUF_SIMPLE)
    try:
        r.p, r.n, r.at = <const uint8_t *>view.buf, view.len, 0
        value = _unpacked(&r, 0)
    except (UnicodeDecodeError, TypeError):  # msgpack's errors, on its path
        return None
    finally:
        PyBuffer_Release(&view)
    if value is _NOT or r.at != r.n or not PyList_CheckExact(value) \
            or PyList_GET_SIZE(value) != fields:
        return None
    return PyList_AsTuple(value)


def parse_request(object header):
    """(op as an int, id, model, version, tensors, params) of a request's
    header, or None where the fast path does not read it."""
    return _header(header, 6)


def parse_response(object header):
    """(id, code, body, tensors) of a response's header, or None where the
    fast path does not read it."""
    return _header(header, 4)
