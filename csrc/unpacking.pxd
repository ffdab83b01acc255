# msgpack read in place from a buffer, value by value: the reading steps
# that wire.pyx (the TCP frames) and records.pyx (the ring records) share, as
# packing.pxd holds their writing ones. Each step reads the value it names,
# or leaves `at` where it was and says so (-1, NULL, None, False), and the
# caller hands the whole buffer to msgpack's way, which also says what is
# wrong with it. Inline, so each module that cimports them compiles its own copy.
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int8_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcmp


cdef struct In:
    const uint8_t *p
    Py_ssize_t n, at


cdef inline bint has(In *r, Py_ssize_t size):
    return r.n - r.at >= size


cdef inline uint64_t take_be(In *r, int size):
    cdef uint64_t v = 0
    cdef int i
    for i in range(size):
        v = (v << 8) | r.p[r.at + i]
    r.at += size
    return v


cdef inline Py_ssize_t read_length(In *r, uint8_t fix, uint8_t fix_mask, uint8_t h8,
                                   uint8_t h16, uint8_t h32):
    """The length a header of this kind says (and the header read); -1 if
    the next value is none of them, or is cut short."""
    cdef uint8_t b
    cdef int size
    if not has(r, 1):
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
    if not has(r, 1 + size):
        return -1
    r.at += 1
    return <Py_ssize_t>take_be(r, size)


cdef inline Py_ssize_t read_map(In *r):
    return read_length(r, 0x80, 0x0f, 0, 0xde, 0xdf)


cdef inline Py_ssize_t read_array(In *r):
    return read_length(r, 0x90, 0x0f, 0, 0xdc, 0xdd)


cdef inline const char *read_raw(In *r, Py_ssize_t *size, bint binary):
    """A str's (or, `binary`, a bin's) bytes in place; NULL if the next
    value is not one, or is cut short."""
    cdef Py_ssize_t n, at = r.at
    if binary:
        n = read_length(r, 0, 0, 0xc4, 0xc5, 0xc6)
    else:
        n = read_length(r, 0xa0, 0x1f, 0xd9, 0xda, 0xdb)
    if n < 0 or not has(r, n):
        r.at = at
        return NULL
    size[0] = n
    r.at += n
    return <const char *>(r.p + r.at - n)


cdef inline bint read_key(In *r, const char *name, Py_ssize_t size):
    """Whether the next value is the str `name` (read if it is)."""
    cdef Py_ssize_t at = r.at, n
    cdef const char *s = read_raw(r, &n, False)
    if s != NULL and n == size and memcmp(s, name, size) == 0:
        return True
    r.at = at
    return False


cdef inline int read_any_int(In *r, uint64_t *u):
    """A msgpack int's bits into `u`: 0 where it is unsigned (a positive
    fixint, uint8..64), 1 where it is signed (a negative fixint, int8..64:
    int64's bits); -1 if the next value is none, or is cut short."""
    cdef uint8_t b
    cdef int size
    if not has(r, 1):
        return -1
    b = r.p[r.at]
    if b < 0x80 or b >= 0xe0:  # a fixint
        r.at += 1
        u[0] = <uint64_t><int64_t><int8_t>b
        return b >= 0xe0
    if not 0xcc <= b <= 0xd3:
        return -1
    size = 1 << ((b - 0xcc) & 3)
    if not has(r, 1 + size):
        return -1
    r.at += 1
    u[0] = take_be(r, size)
    if b <= 0xcf:
        return 0
    if size < 8 and u[0] >> (8 * size - 1):
        u[0] |= ~((<uint64_t>1 << (8 * size)) - 1)  # its sign, extended
    return 1


cdef inline int read_int(In *r, int64_t *v, bint negative):
    """A msgpack int of 0..2**63-1 (or, `negative`, of int64's range) read
    into `v` (0), or not one (-1)."""
    cdef Py_ssize_t at = r.at
    cdef uint64_t u
    cdef int signed = read_any_int(r, &u)
    if signed < 0 or signed and not negative or not signed and u >> 63:  # (past int64)
        r.at = at
        return -1
    v[0] = <int64_t>u
    return 0


cdef inline object read_str(In *r):
    """The next value as a str, or None if it is not one."""
    cdef Py_ssize_t n
    cdef const char *s = read_raw(r, &n, False)
    return None if s == NULL else PyUnicode_DecodeUTF8(s, n, NULL)
