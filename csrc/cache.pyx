"""NativeCache: the model cache's books in C (see cache.pxd).

The API and its semantics are those of mmengine.cache.PyCache, documented
there; tests/test_cache.py holds the two to each other.
"""
cimport cython
from cpython.long cimport PyLong_AsLongAndOverflow, PyLong_AsLongLongAndOverflow
from cpython.number cimport PyNumber_Index
from cpython.object cimport Py_EQ, PyObject_Hash, PyObject_RichCompareBool
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, int64_t, uint32_t

from cache cimport *


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
    cdef list _keys         # slot -> key, owning it; None on free slots
    cdef size_t _changes    # inserts and removes so far

    def __cinit__(self, workers, policy=MM_LRU):
        self._keys = []
        _check(mm_cache_init(&self.c, _int32(workers), _int32(policy)))

    def __dealloc__(self):
        mm_cache_free(&self.c)

    # The index (cache.pxd): a key is found as a dict finds it, the same
    # object, or one with the same hash that compares equal.

    cdef inline int32_t _find(self, object key, Py_hash_t h) except -2:
        """The slot of key, whose hash is h, or MM_NIL."""
        cdef uint32_t tag = mm_tag(h)
        cdef uint32_t pos = mm_index_home(&self.c, tag)
        cdef int32_t s = mm_index_next(&self.c, tag, &pos)
        while s != MM_NIL:
            if self.c.node[s].key == <void *>key:
                return s
            if self.c.node[s].hash == h:
                return self._find_equal(key, h)
            s = mm_index_next(&self.c, tag, &pos)
        return MM_NIL

    cdef int32_t _find_equal(self, object key, Py_hash_t h) except -2:
        # Off the hot path: == runs Python code, which may change the cache
        # (even remove the key compared, held here meanwhile); the search
        # then starts over, as a dict's does.
        cdef uint32_t tag = mm_tag(h), pos
        cdef int32_t s
        cdef size_t changes
        cdef object other
        while True:
            changes = self._changes
            pos = mm_index_home(&self.c, tag)
            s = mm_index_next(&self.c, tag, &pos)
            while s != MM_NIL:
                if self.c.node[s].key == <void *>key:
                    return s
                if self.c.node[s].hash == h:
                    other = <object>self.c.node[s].key
                    equal = PyObject_RichCompareBool(other, key, Py_EQ)
                    if self._changes != changes:
                        break
                    if equal:
                        return s
                s = mm_index_next(&self.c, tag, &pos)
            else:
                return MM_NIL

    cdef inline int32_t _slot(self, object key) except -1:
        # The hot path: one hash, one probe, and no Python object made.
        cdef int32_t s = self._find(key, PyObject_Hash(key))
        if s == MM_NIL:
            raise KeyError(key)
        return s

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

    def leaving(self, worker):
        cdef int32_t k = mm_counter(&self.c, MM_DEVICE, _int32(worker))
        _check(-k if k < 0 else 0)
        return self.c.leaving[k - MM_DEVICE]

    # -- entries ------------------------------------------------------

    def insert(self, key, state=MM_LOADING, worker=MM_NIL):
        cdef int32_t slot = MM_NIL
        cdef Py_hash_t h = PyObject_Hash(key)
        if self._find(key, h) != MM_NIL:
            raise KeyError(key)
        cdef size_t changes = self._changes
        cdef int32_t st = _int32(state), w = _int32(worker)
        # __index__ may have run Python code that inserted the key.
        if self._changes != changes and self._find(key, h) != MM_NIL:
            raise KeyError(key)
        if len(self._keys) < self.c.n_slots + 1:
            # Room for a slot the insert may add, before anything changes.
            self._keys.extend([None] * max(32, self.c.n_slots))
        _check(mm_insert(&self.c, st, w, h, <void *>key, &slot))
        self._keys[slot] = key      # owns the key node[slot].key borrows
        self._changes += 1

    def remove(self, key):
        cdef int32_t slot = self._slot(key)
        mm_remove(&self.c, slot)
        self._changes += 1
        # Last: dropping the key may run Python code (__del__).
        self._keys[slot] = None

    def __contains__(self, key):
        return self._find(key, PyObject_Hash(key)) != MM_NIL

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
        cdef mm_node *n = &self.c.node[self._slot(key)]
        n.pins += 1
        return n.pins

    @cython.binding(False)
    @cython.always_allow_keywords(False)
    def unpin(self, key):
        cdef int32_t slot = self._slot(key)
        _check(mm_unpin(&self.c, slot))
        return self.c.node[slot].pins

    release = unpin         # the request path's way out: one implementation

    # Each looks the key up first (KeyError before a bad value), and again
    # where converting a value (__index__) ran Python code that removed or
    # inserted keys: its slot may be free, or another key's, by then.

    cdef inline int32_t _again(self, object key, int32_t slot, size_t changes) except -1:
        return slot if self._changes == changes else self._slot(key)

    def set_state(self, key, state):
        cdef size_t changes = self._changes
        cdef int32_t slot = self._slot(key), st = _int32(state)
        _check(mm_set_state(&self.c, self._again(key, slot, changes), st))

    def set_worker(self, key, worker):
        cdef size_t changes = self._changes
        cdef int32_t slot = self._slot(key), w = _int32(worker)
        _check(mm_set_worker(&self.c, self._again(key, slot, changes), w))

    def set_bytes(self, key, tier, nbytes):
        cdef size_t changes = self._changes
        cdef int32_t slot = self._slot(key)
        cdef int64_t n = _nbytes(nbytes)
        cdef int32_t t = _int32(tier)
        _check(mm_set_bytes(&self.c, self._again(key, slot, changes), t, n))

    def set_cost(self, key, double cost):
        _check(mm_set_cost(&self.c, self._slot(key), cost))

    def entry(self, key):
        cdef int32_t slot = self._slot(key)
        cdef mm_entry *e = &self.c.e[slot]
        cdef mm_node *n = &self.c.node[slot]
        return Entry(n.state, n.worker, e.bytes[MM_DEVICE], e.bytes[MM_HOST],
                     e.bytes[MM_DISK], n.pins, n.hits, n.last_use)

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

    def victims(self, tier, worker, bytes_needed, double high, double low,
                bint peek=False):
        cdef int32_t n, reason
        _check(mm_victims(&self.c, _int32(tier), _int32(worker),
                          _nbytes(bytes_needed), high, low, peek, &n, &reason))
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
        """Checks every link, bucket and counter against the entries, O(n);
        raises InternalError if they disagree."""
        _check(mm_verify(&self.c))
        cdef int32_t s
        cdef object key
        for s in range(self.c.n_slots):
            key = self._keys[s] if s < len(self._keys) else None
            if self.c.node[s].state == MM_FREE:
                if key is not None or self.c.node[s].key != NULL:
                    _check(MM_ECORRUPT)
            elif (self.c.node[s].key != <void *>key
                  or self.c.node[s].hash != PyObject_Hash(key)
                  or self._find(key, self.c.node[s].hash) != s):
                _check(MM_ECORRUPT)


# Imported last: mmengine.cache imports this module at its end, and whichever
# of the two is imported first must find the other's names already defined.
from mmengine.cache import Entry, convert_error
