"""NativeCache: the model cache's books in C (see cache.pxd).

The API and its semantics are those of mmengine.cache.PyCache, documented
there; tests/test_cache.py holds the two to each other.
"""
cimport cython
from cpython.dict cimport PyDict_GetItemWithError
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from cpython.ref cimport PyObject
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, int64_t

from cache cimport *


cdef extern from *:
    """
    /* A slot's int, read in place: the dict holds only slots, non-negative
     * and under 2**31, so one digit but for huge caches. No call, no
     * reference count written, on the hot path. */
    static inline int32_t mm_slot_value(PyObject *o)
    {
    #if PY_VERSION_HEX >= 0x030C0000
        if (PyUnstable_Long_IsCompact((PyLongObject *)o))
            return (int32_t)PyUnstable_Long_CompactValue((PyLongObject *)o);
    #else
        if (Py_SIZE(o) == 1)
            return (int32_t)((PyLongObject *)o)->ob_digit[0];
        if (Py_SIZE(o) == 0)
            return 0;
    #endif
        return (int32_t)PyLong_AsLong(o);
    }
    """
    int32_t mm_slot_value(PyObject *o)


cdef inline int _check(int err) except -1:
    if err:
        raise convert_error(err)
    return 0


# Integer arguments go through __index__, as in PyCache: Cython's own
# conversion would truncate a float.

cdef inline int32_t _int32(object v) except? -2:
    # An int past int32 is out of every valid range; -2 is too, and lets
    # the C side report it with the error of the argument it stands for.
    cdef int overflow = 0
    cdef long n = PyLong_AsLongAndOverflow(PyNumber_Index(v), &overflow)
    return n if not overflow and INT32_MIN <= n <= INT32_MAX else -2


cdef inline int64_t _nbytes(object v) except -1:
    cdef int overflow = 0
    cdef long long n = PyLong_AsLongLongAndOverflow(PyNumber_Index(v),
                                                    &overflow)
    if overflow or n < 0:
        raise convert_error(MM_ENEGATIVE)
    return n


@cython.final
cdef class NativeCache:
    cdef mm_cache c
    cdef dict _slots        # key -> slot
    cdef list _keys         # slot -> key; None on free slots

    def __cinit__(self, workers, policy=MM_LRU):
        self._slots = {}
        self._keys = []
        _check(mm_cache_init(&self.c, _int32(workers), _int32(policy)))

    def __dealloc__(self):
        mm_cache_free(&self.c)

    cdef int32_t _slot(self, object key) except -1:
        # The hot path: one dict lookup, and the slot's int is borrowed.
        cdef PyObject *slot = PyDict_GetItemWithError(self._slots, key)
        if slot is NULL:
            raise KeyError(key)
        # The dict holds only slots, which fit: this cannot fail.
        return mm_slot_value(slot)

    cdef list _answer(self, int32_t n):
        cdef list keys = self._keys
        return [keys[self.c.picks[i].slot] for i in range(n)]

    # -- counters -----------------------------------------------------

    def set_capacity(self, tier, worker, nbytes):
        _check(mm_set_capacity(&self.c, _int32(tier), _int32(worker),
                               _nbytes(nbytes)))

    def capacity(self, tier, worker):
        cdef int32_t k = mm_counter(&self.c, _int32(tier), _int32(worker))
        _check(-k if k < 0 else 0)
        return self.c.cap[k]

    def used(self, tier, worker):
        cdef int32_t k = mm_counter(&self.c, _int32(tier), _int32(worker))
        _check(-k if k < 0 else 0)
        return self.c.used[k]

    # -- entries ------------------------------------------------------

    def insert(self, key, state=MM_LOADING, worker=MM_NIL):
        cdef int32_t slot = MM_NIL
        if key in self._slots:
            raise KeyError(key)
        _check(mm_insert(&self.c, _int32(state), _int32(worker), &slot))
        if len(self._keys) < self.c.n_slots:
            self._keys.extend([None] * (self.c.n_slots - len(self._keys)))
        self._slots[key] = slot
        self._keys[slot] = key

    def remove(self, key):
        cdef int32_t slot = self._slot(key)
        mm_remove(&self.c, slot)
        del self._slots[key]
        self._keys[slot] = None

    def __contains__(self, key):
        return key in self._slots

    def __len__(self):
        return self.c.count

    # The request path and its kin, made lean: plain C methods (binding
    # False: a bound call goes straight to C), METH_O where one argument
    # (so key is positional-only, as in PyCache), one dict lookup each.

    @cython.binding(False)
    def touch(self, key, double now):
        mm_touch(&self.c, self._slot(key), now)

    @cython.binding(False)
    def acquire(self, key, double now):
        return mm_acquire(&self.c, self._slot(key), now)

    @cython.binding(False)
    @cython.always_allow_keywords(False)
    def pin(self, key):
        cdef mm_entry *e = &self.c.e[self._slot(key)]
        e.pins += 1
        return e.pins

    @cython.binding(False)
    @cython.always_allow_keywords(False)
    def unpin(self, key):
        cdef int32_t slot = self._slot(key)
        _check(mm_unpin(&self.c, slot))
        return self.c.e[slot].pins

    release = unpin         # the request path's way out: one implementation

    def set_state(self, key, state):
        _check(mm_set_state(&self.c, self._slot(key), _int32(state)))

    def set_worker(self, key, worker):
        _check(mm_set_worker(&self.c, self._slot(key), _int32(worker)))

    def set_bytes(self, key, tier, nbytes):
        cdef int32_t slot = self._slot(key)
        _check(mm_set_bytes(&self.c, slot, _int32(tier), _nbytes(nbytes)))

    def set_cost(self, key, double cost):
        _check(mm_set_cost(&self.c, self._slot(key), cost))

    def entry(self, key):
        cdef int32_t slot = self._slot(key)
        cdef mm_entry *e = &self.c.e[slot]
        return Entry(e.state, e.worker, e.bytes[MM_DEVICE], e.bytes[MM_HOST],
                     e.bytes[MM_DISK], e.pins, self.c.node[slot].hits,
                     self.c.node[slot].last_use)

    def priority(self, key):
        """GDSF's H of the entry (computed under LRU too, unused there)."""
        return mm_priority(&self.c, self._slot(key))

    # -- walks --------------------------------------------------------

    def lru_keys(self):
        cdef list keys = []
        cdef int32_t s = self.c.head
        while s != MM_NIL:
            keys.append(self._keys[s])
            s = self.c.node[s].next
        return keys

    def idle(self, double now, double idle_s):
        return self._answer(mm_idle(&self.c, now, idle_s))

    def victims(self, tier, worker, bytes_needed, double high, double low):
        cdef int32_t n, reason
        _check(mm_victims(&self.c, _int32(tier), _int32(worker),
                          _nbytes(bytes_needed), high, low, &n, &reason))
        return self._answer(n), reason

    # -- the whole --------------------------------------------------------

    def stats(self):
        return {
            "entries": self.c.count,
            "policy": self.c.policy,
            "inflation": self.c.inflation,
            "host": (self.c.used[MM_HOST], self.c.cap[MM_HOST]),
            "disk": (self.c.used[MM_DISK], self.c.cap[MM_DISK]),
            "device": [(self.c.used[MM_DEVICE + w], self.c.cap[MM_DEVICE + w])
                       for w in range(self.c.workers)],
        }

    def verify(self):
        """Checks every link and counter against the entries, O(n); raises
        InternalError if they disagree."""
        _check(mm_verify(&self.c))
        if len(self._slots) != self.c.count or any(
                self._keys[s] is not k for k, s in self._slots.items()):
            _check(MM_ECORRUPT)


# Imported last: mmengine.cache imports this module at its end, and whichever
# of the two is imported first must find the other's names already defined.
from mmengine.cache import Entry, convert_error
