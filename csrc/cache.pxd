# The model cache's accounting core: what the engine's cache manager counts
# and how it chooses what to evict. Python decides policy (when to load,
# what to do with victims); this module only keeps the books.
#
# Shape
#   An entry is one (model, version). Entries live in C arrays and are
#   named by slot. Keys map to slots through the index, an open-addressing
#   hash table in C (below); NativeCache keeps slot -> key in a list, which
#   owns the keys (and lets the garbage collector see them), and the node
#   of a slot holds the same key as a borrowed pointer. A call on the request
#   path hashes its key once, creates no Python object, and reads one bucket
#   and one node.
#
# Index
#   Linear probing over 8-byte buckets {tag, slot}, a power of two long and
#   at most 3/4 full (doubled on insert past that); the tag is the low half
#   of the key's Python hash, and a tag's first bucket is its Fibonacci
#   hash (tag * 2**32/phi, top bits), so that sequential or aligned hashes
#   spread. Deletion shifts the run back (no tombstones). C never looks at a
#   key: mm_index_next answers the slots whose tag matches, and NativeCache
#   takes node[slot].key if it is the same object, else if its full hash
#   (node[slot].hash) is equal and == says so: a dict's rule. Hashes that
#   collide (a key class with a constant hash) make probes O(n), as in a
#   dict.
#
# Order
#   A doubly linked list through the slots keeps LRU order (head = least
#   recently used); free slots are chained through `next`. An entry is split
#   in two parallel arrays: mm_node holds what the request path reads and
#   writes (the links, state, pins, worker, hits, last use, the key's tag
#   and pointer), one 64-byte cache line; mm_entry the rest (bytes, cost).
#   An acquire then reads and writes its node and its neighbours' links and
#   no entry. The arrays double when full; a live entry keeps its slot.
#
# Bytes
#   int64 counters per tier: host and disk are machine-wide, device is one
#   counter per worker. An entry holds bytes on each tier; its device bytes
#   count on its worker, so an entry without a worker holds none there.
#   Every change to an entry's bytes changes its counter in the same call.
#   Per worker, `leaving` counts the device bytes of its UNLOADING entries
#   (kept by every call that changes an entry's state, worker or device
#   bytes): their unloads are sent, and the worker's loader frees a model
#   before it reads the next record, so a load sent now finds them gone.
#
# Eviction
#   A candidate is READY, unpinned and holds bytes on the tier (the worker
#   for the device tier). Pins count explicit pins and requests in flight.
#   mm_victims answers nothing when the tier stays under its high
#   watermark, else candidates in policy order until it is under the low
#   one (on a device, its leaving bytes counted gone: two evictors, one
#   after the other, each evict for the same room otherwise). LRU walks from the head; GDSF sorts the candidates by
#   H = L + (hits + 1) * cost / max(size, 1), ties by LRU position, and
#   raises L to the largest H it answers (not when it only peeks).
#
# The request path
#   A request is one call each way: mm_acquire pins, touches and counts a
#   hit of a READY entry (a touch alone moves it to the MRU end and counts
#   nothing: a load is not a use) and answers its worker (else MM_NIL, changing nothing), and
#   release is mm_unpin. NativeCache makes each one hash, one probe of the
#   index and no Python object (the answers are small ints, which Python
#   caches).
#
# Errors
#   Calls that can fail return an MM_E* code and change nothing when they
#   do; mmengine.cache.convert_error turns the code into an exception. The
#   invariants are MM_ASSERTed (debug builds) and mm_verify checks them all.
#
# The pure-Python twin, mmengine.cache.PyCache, has the same API and is the
# oracle of tests/test_cache.py. cache.pyx cimports this file whole.

from libc.stdint cimport int32_t, int64_t, uint32_t


cdef extern from "cache.h" nogil:
    enum:
        MM_HOST
        MM_DISK
        MM_DEVICE
        MM_NTIERS

    enum:
        MM_LOADING
        MM_READY
        MM_UNLOADING
        MM_FAILED
        MM_FREE             # slot state while on the free list

    enum:
        MM_LRU
        MM_GDSF

    enum:                   # victims' reason
        MM_OK
        MM_TOO_LARGE        # needs more than the tier's whole capacity
        MM_PINNED           # not enough unpinned READY bytes to make room

    enum:                   # error codes; mirrored by mmengine.cache.E_*
        MM_EOK
        MM_ETIER
        MM_EWORKER
        MM_ESTATE
        MM_EPOLICY
        MM_ENEGATIVE
        MM_ENOWORKER        # device bytes for an entry without a worker
        MM_EDEVICEBYTES     # dropping the worker of an entry with device bytes
        MM_EOVERFLOW        # a counter would pass INT64_MAX
        MM_EUNPINNED
        MM_ECOST
        MM_EWATERMARK
        MM_ENOMEM
        MM_ECORRUPT

    int32_t MM_NIL          # "no slot", "no worker"

    ctypedef struct mm_node:        # node[s]: the request path's part
        int32_t prev                # LRU order; MM_NIL at the ends
        int32_t next                # also the free list's link
        int64_t hits                # requests that acquired it
        double last_use             # the `now` of the last touch, else 0.0
        double base                 # GDSF L at insert or last touch
        int64_t pins
        const void *key             # as given to insert; NULL when free
        int64_t hash                # the key's; its bucket's tag: mm_tag
        int32_t worker              # MM_NIL: none
        int32_t state               # MM_LOADING .. MM_FAILED, MM_FREE

    ctypedef struct mm_entry:       # e[s]: the rest of slot s
        int64_t bytes[3]    # per tier; device bytes count on node[s].worker
        double cost         # GDSF cost of a miss, 1.0 by default

    ctypedef struct mm_bucket:      # one bucket of the index
        uint32_t tag
        int32_t slot                # MM_NIL: empty

    ctypedef struct mm_pick:        # one row of a victims or idle answer
        double h                    # GDSF priority
        int32_t rank                # LRU position, breaks ties of h
        int32_t slot

    ctypedef struct mm_cache:
        mm_node *node       # n_slots long, 64-byte aligned
        mm_entry *e         # n_slots long
        mm_bucket *index    # mask + 1 long
        uint32_t mask       # buckets - 1, buckets a power of two
        mm_pick *picks      # n_slots long, so any answer fits
        int64_t *used       # [host, disk, device of worker 0, 1, ...]
        int64_t *cap        # same layout as used
        int64_t *leaving    # [worker 0, 1, ...]: UNLOADING device bytes
        double inflation    # GDSF L
        int32_t n_slots     # allocated slots
        int32_t count       # live entries
        int32_t head        # least recently used, MM_NIL when empty
        int32_t tail        # most recently used
        int32_t free        # head of the free list
        int32_t workers
        int32_t policy

    # Set-up. init leaves c safe to free even when it fails.
    int mm_cache_init(mm_cache *c, int32_t workers, int32_t policy)
    void mm_cache_free(mm_cache *c)

    # Index into used/cap of (tier, worker), or -(error code); the worker
    # is ignored for host and disk.
    int32_t mm_counter(const mm_cache *c, int32_t tier, int32_t worker)
    double mm_priority(const mm_cache *c, int32_t s)    # GDSF H

    # The index. tag: a key's hash's low half; home: where its probe starts;
    # next: the slot of the next bucket on the probe with that tag, or
    # MM_NIL at the first empty bucket (then no key with that tag follows).
    uint32_t mm_tag(int64_t hash)
    uint32_t mm_index_home(const mm_cache *c, uint32_t tag)
    int32_t mm_index_next(const mm_cache *c, uint32_t tag, uint32_t *pos)

    # Entries, by slot; the caller guarantees the slot is live. O(1) each
    # (insert: amortized, as the index doubles). insert indexes the key
    # under its hash; the caller has checked that no equal key is there.
    int mm_insert(mm_cache *c, int32_t state, int32_t worker, int64_t hash,
                  const void *key, int32_t *slot)
    void mm_remove(mm_cache *c, int32_t s)
    void mm_touch(mm_cache *c, int32_t s, double now)
    int32_t mm_acquire(mm_cache *c, int32_t s, double now)  # worker or MM_NIL
    int mm_unpin(mm_cache *c, int32_t s)    # also release
    int mm_set_state(mm_cache *c, int32_t s, int32_t state)
    int mm_set_cost(mm_cache *c, int32_t s, double cost)
    int mm_set_worker(mm_cache *c, int32_t s, int32_t worker)
    int mm_set_bytes(mm_cache *c, int32_t s, int32_t tier, int64_t n)
    int mm_set_capacity(mm_cache *c, int32_t tier, int32_t worker, int64_t n)

    # Walks; the answer is c.picks[0 .. n). victims: O(victims + skipped)
    # under LRU, O(n log n) under GDSF. idle: O(answer).
    int mm_victims(mm_cache *c, int32_t tier, int32_t worker, int64_t need,
                   double high, double low, int peek, int32_t *n, int32_t *reason)
    int32_t mm_idle(mm_cache *c, double now, double idle_s)

    # O(n): every link, slot, bucket and counter against the entries.
    int mm_verify(const mm_cache *c)

