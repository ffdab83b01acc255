/* The model cache's accounting core: plain C, no Python.
 *
 * An entry is named by its slot and lives in two parallel arrays: node[s]
 * holds what the request path reads and writes (the LRU links, state, pins,
 * worker, hits, last use, the key's pointer and hash), one 64-byte cache
 * line; e[s] the rest (bytes, cost). A request then reads one bucket of the
 * index and the node, relinks it, and reads no entry. The links make a
 * doubly linked list in LRU order (head = least recently used); free slots
 * are chained through `next`. Byte counters are kept per tier: host, disk,
 * then one device counter per worker; and per worker, the device bytes of
 * its UNLOADING entries (`leaving`): their unloads are on their way to the
 * worker, ahead of any load sent after, so making room counts them gone.
 *
 * The index maps keys to slots: open addressing with linear probing over
 * 8-byte buckets {tag, slot}, at most 3/4 full, deletion by backward shift
 * (no tombstones). A key is opaque here: the caller hashes it, walks the
 * buckets whose tag (the hash's low 32 bits) matches with mm_index_next and
 * compares keys itself: node[s] holds the pointer and the hash it gave to
 * insert.
 * Every operation except the walks (victims, idle, verify) and the index's
 * growth is O(1) (expected, for the index).
 *
 * Functions that can fail return an MM_E* code (MM_EOK = 0); they check
 * their arguments before changing anything, so a failed call changes
 * nothing. The codes are mirrored by E_* in mmengine/cache.py, which turns
 * them into exceptions.
 */
#ifndef MMENGINE_CACHE_H
#define MMENGINE_CACHE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "debug.h"

enum { MM_HOST = 0, MM_DISK = 1, MM_DEVICE = 2, MM_NTIERS = 3 };
enum { MM_LOADING = 0, MM_READY = 1, MM_UNLOADING = 2, MM_FAILED = 3,
       MM_FREE = -1 };
enum { MM_LRU = 0, MM_GDSF = 1 };
enum { MM_OK = 0, MM_TOO_LARGE = 1, MM_PINNED = 2 };
enum {
    MM_EOK = 0, MM_ETIER, MM_EWORKER, MM_ESTATE, MM_EPOLICY, MM_ENEGATIVE,
    MM_ENOWORKER, MM_EDEVICEBYTES, MM_EOVERFLOW, MM_EUNPINNED, MM_ECOST,
    MM_EWATERMARK, MM_ENOMEM, MM_ECORRUPT,
};

#define MM_NIL (-1)
/* Workers a cache books: MM_DEVICE + worker must fit an int32 (mmengine.cache.MAX_WORKERS). */
#define MM_MAX_WORKERS (1 << 20)
#define MM_GOLDEN 0x9E3779B9u /* 2**32 / the golden ratio: Fibonacci hashing */
#define MM_INDEX_BITS 4
#define MM_INDEX_MIN (1u << MM_INDEX_BITS)

typedef struct {
    int32_t prev, next;       /* slots; MM_NIL at the ends */
    int64_t hits;
    double last_use;
    double base;              /* GDSF: the inflation L at insert or last hit */
    int64_t pins;
    const void *key;          /* the caller's, opaque; NULL on free slots */
    int64_t hash;             /* the key's; its bucket's tag is mm_tag(hash) */
    int32_t worker;           /* MM_NIL: none, and then no device bytes */
    int32_t state;            /* MM_FREE while the slot is on the free list */
} mm_node;
_Static_assert(sizeof(mm_node) == 64, "a node is one cache line");

typedef struct {
    int64_t bytes[MM_NTIERS]; /* device bytes count on node[s].worker */
    double cost;
} mm_entry;

typedef struct {
    uint32_t tag;
    int32_t slot;             /* MM_NIL: empty */
} mm_bucket;

/* One victims/idle answer row; `rank` (LRU position) breaks GDSF ties. */
typedef struct {
    double h;
    int32_t rank;
    int32_t slot;
} mm_pick;

typedef struct {
    mm_node *node;            /* n_slots long, 64-byte aligned */
    mm_entry *e;              /* n_slots long */
    mm_bucket *index;         /* mask + 1 long, a power of two */
    uint32_t mask, shift;     /* home of a tag: (tag * MM_GOLDEN) >> shift */
    mm_pick *picks;           /* n_slots long, so an answer always fits */
    int64_t *used, *cap;      /* [host, disk, device of worker 0, 1, ...] */
    int64_t *leaving;         /* [worker 0, 1, ...]: UNLOADING device bytes */
    double inflation;         /* GDSF L: the largest H evicted so far */
    int32_t n_slots, count;
    int32_t head, tail, free;
    int32_t workers, policy;
} mm_cache;

static inline int mm_cache_init(mm_cache *c, int32_t workers, int32_t policy)
{
    *c = (mm_cache){.head = MM_NIL, .tail = MM_NIL, .free = MM_NIL};
    if (workers < 0 || workers > MM_MAX_WORKERS)
        return MM_EWORKER;
    if (policy != MM_LRU && policy != MM_GDSF)
        return MM_EPOLICY;
    c->workers = workers;
    c->policy = policy;
    c->used = calloc((size_t)workers + 2, sizeof(int64_t));
    c->cap = calloc((size_t)workers + 2, sizeof(int64_t));
    c->leaving = calloc((size_t)workers + 1, sizeof(int64_t));
    c->index = malloc(MM_INDEX_MIN * sizeof(mm_bucket));
    if (!c->used || !c->cap || !c->leaving || !c->index)
        return MM_ENOMEM;
    for (uint32_t i = 0; i < MM_INDEX_MIN; i++)
        c->index[i] = (mm_bucket){.slot = MM_NIL};
    c->mask = MM_INDEX_MIN - 1;
    c->shift = 32 - MM_INDEX_BITS;
    return MM_EOK;
}

static inline void mm_cache_free(mm_cache *c)
{
    free(c->node);
    free(c->e);
    free(c->picks);
    free(c->index);
    free(c->used);
    free(c->cap);
    free(c->leaving);
    *c = (mm_cache){.head = MM_NIL, .tail = MM_NIL, .free = MM_NIL};
}

/* The counter of (tier, worker), or -(error code). */
static inline int32_t mm_counter(const mm_cache *c, int32_t tier,
                                 int32_t worker)
{
    if (tier == MM_HOST || tier == MM_DISK)
        return tier;
    if (tier != MM_DEVICE)
        return -MM_ETIER;
    if (worker < 0 || worker >= c->workers)
        return -MM_EWORKER;
    return MM_DEVICE + worker;
}

static inline int32_t mm_entry_counter(const mm_cache *c, int32_t s,
                                       int32_t tier)
{
    return tier == MM_DEVICE ? MM_DEVICE + c->node[s].worker : tier;
}

/* Adds `sign` times slot s's device bytes to its worker's leaving count,
 * if it is UNLOADING: before (-1) and after (+1) a change of its state,
 * worker or device bytes. */
static inline void mm_leave(mm_cache *c, int32_t s, int64_t sign)
{
    const mm_node *n = &c->node[s];
    if (n->state == MM_UNLOADING && n->worker != MM_NIL) {
        c->leaving[n->worker] += sign * c->e[s].bytes[MM_DEVICE];
        MM_ASSERT(c->leaving[n->worker] >= 0);
    }
}

static inline int64_t mm_entry_size(const mm_entry *e)
{
    int64_t size = 1;
    for (int t = 0; t < MM_NTIERS; t++)
        if (e->bytes[t] > size)
            size = e->bytes[t];
    return size;
}

/* GDSF: H = L + (hits + 1) * cost / max(size, 1), with L taken when the
 * entry was inserted or last touched. Computed when asked, so a size or cost
 * that changes after a hit moves H without re-inflating it. */
static inline double mm_priority(const mm_cache *c, int32_t s)
{
    const mm_node *n = &c->node[s];
    return n->base + (double)(n->hits + 1) * c->e[s].cost
                         / (double)mm_entry_size(&c->e[s]);
}

/* The rest + need > frac * cap test of the watermarks, in doubles;
 * mmengine/cache.py does the same arithmetic to agree to the last bit. */
static inline int mm_over(int64_t rest, int64_t need, double frac, int64_t cap)
{
    return (double)rest + (double)need > frac * (double)cap;
}

static inline void mm_unlink(mm_cache *c, int32_t s)
{
    const mm_node *l = &c->node[s];
    MM_ASSERT(l->prev == MM_NIL ? c->head == s : c->node[l->prev].next == s);
    MM_ASSERT(l->next == MM_NIL ? c->tail == s : c->node[l->next].prev == s);
    if (l->prev == MM_NIL)
        c->head = l->next;
    else
        c->node[l->prev].next = l->next;
    if (l->next == MM_NIL)
        c->tail = l->prev;
    else
        c->node[l->next].prev = l->prev;
}

static inline void mm_link_mru(mm_cache *c, int32_t s)
{
    c->node[s].prev = c->tail;
    c->node[s].next = MM_NIL;
    if (c->tail == MM_NIL)
        c->head = s;
    else
        c->node[c->tail].next = s;
    c->tail = s;
}

/* -- the index ------------------------------------------------------- */

/* A key's bucket tag: the low half of its hash (node[s].hash has it all). */
static inline uint32_t mm_tag(int64_t hash)
{
    return (uint32_t)(uint64_t)hash;
}

/* The first bucket of a tag's probe sequence. The multiply spreads hashes
 * that differ only in their high bits, or are multiples of the size. */
static inline uint32_t mm_index_home(const mm_cache *c, uint32_t tag)
{
    return (uint32_t)(tag * MM_GOLDEN) >> c->shift;  /* shift: 1 .. 28 */
}

/* Walks a tag's probe sequence from bucket *pos (start: mm_index_home): the
 * slot of the next bucket with that tag, *pos moved past it; or MM_NIL at
 * the first empty bucket, where the key would go. The caller compares keys:
 * node[slot].key is the key of the answer. */
static inline int32_t mm_index_next(const mm_cache *c, uint32_t tag,
                                    uint32_t *pos)
{
    for (;;) {
        mm_bucket b = c->index[*pos];
        *pos = (*pos + 1) & c->mask;
        if (b.slot == MM_NIL || b.tag == tag)
            return b.slot;
    }
}

/* The bucket holding slot s, found by its tag; the slot must be indexed. */
static inline uint32_t mm_index_find_slot(const mm_cache *c, int32_t s)
{
    uint32_t i = mm_index_home(c, mm_tag(c->node[s].hash));
    while (c->index[i].slot != s) {
        MM_ASSERT(c->index[i].slot != MM_NIL);
        i = (i + 1) & c->mask;
    }
    return i;
}

/* Puts a bucket in the first empty place of its probe sequence. */
static inline void mm_index_put(mm_cache *c, mm_bucket b)
{
    uint32_t i = mm_index_home(c, b.tag);
    while (c->index[i].slot != MM_NIL)
        i = (i + 1) & c->mask;
    c->index[i] = b;
}

/* Deletes bucket i by backward shift: every later bucket of the run that
 * may sit at i (its home lies cyclically outside (i, j]) moves up, so that
 * no probe sequence meets a hole before its key. */
static inline void mm_index_delete(mm_cache *c, uint32_t i)
{
    uint32_t m = c->mask;
    for (uint32_t j = (i + 1) & m; c->index[j].slot != MM_NIL; j = (j + 1) & m) {
        uint32_t home = mm_index_home(c, c->index[j].tag);
        if (((j - home) & m) >= ((j - i) & m)) {
            c->index[i] = c->index[j];
            i = j;
        }
    }
    c->index[i].slot = MM_NIL;
}

/* Room for one more key at a load of at most 3/4, doubling the index if
 * need be; on failure the cache is unchanged. */
static inline int mm_index_reserve(mm_cache *c)
{
    uint64_t size = (uint64_t)c->mask + 1;
    if (4 * ((uint64_t)c->count + 1) <= 3 * size)
        return MM_EOK;
    if (size > (1u << 30))
        return MM_ENOMEM;
    mm_bucket *old = c->index;
    mm_bucket *index = malloc(2 * size * sizeof(mm_bucket));
    if (!index)
        return MM_ENOMEM;
    for (uint64_t i = 0; i < 2 * size; i++)
        index[i] = (mm_bucket){.slot = MM_NIL};
    c->index = index;
    c->mask = (uint32_t)(2 * size - 1);
    c->shift--;
    for (uint64_t i = 0; i < size; i++)
        if (old[i].slot != MM_NIL)
            mm_index_put(c, old[i]);
    free(old);
    return MM_EOK;
}

/* Doubles the slot arrays; on failure the cache is unchanged. */
static inline int mm_grow(mm_cache *c)
{
    int32_t lo = c->n_slots, hi = lo ? 2 * lo : 32;
    if (lo > INT32_MAX / 2)
        return MM_ENOMEM;
    /* Two nodes to a cache line: aligned_alloc, as realloc cannot align. */
    mm_node *node = aligned_alloc(64, (size_t)hi * sizeof(mm_node));
    if (!node)
        return MM_ENOMEM;
    if (lo)
        memcpy(node, c->node, (size_t)lo * sizeof(mm_node));
    free(c->node);
    c->node = node;
    mm_entry *e = realloc(c->e, (size_t)hi * sizeof(mm_entry));
    if (!e)
        return MM_ENOMEM;
    c->e = e;
    mm_pick *p = realloc(c->picks, (size_t)hi * sizeof(mm_pick));
    if (!p)
        return MM_ENOMEM;
    c->picks = p;
    for (int32_t s = hi - 1; s >= lo; s--) {
        c->node[s] = (mm_node){.state = MM_FREE, .worker = MM_NIL};
        c->node[s].next = c->free;
        c->free = s;
    }
    c->n_slots = hi;
    return MM_EOK;
}

/* A new entry at the MRU end, indexed under the key's hash; its slot goes
 * to *slot. The caller has checked that no equal key is in the cache. */
static inline int mm_insert(mm_cache *c, int32_t state, int32_t worker,
                            int64_t hash, const void *key, int32_t *slot)
{
    if (state < MM_LOADING || state > MM_FAILED)
        return MM_ESTATE;
    if (worker < MM_NIL || worker >= c->workers)
        return MM_EWORKER;
    if (c->count == INT32_MAX)
        return MM_ENOMEM;
    int err = mm_index_reserve(c);
    if (err)
        return err;
    if (c->free == MM_NIL && (err = mm_grow(c)))
        return err;
    int32_t s = c->free;
    MM_ASSERT(c->node[s].state == MM_FREE);
    c->free = c->node[s].next;
    c->e[s] = (mm_entry){.cost = 1.0};
    c->node[s] = (mm_node){.base = c->inflation, .key = key, .hash = hash,
                           .worker = worker, .state = state};
    mm_link_mru(c, s);
    mm_index_put(c, (mm_bucket){.tag = mm_tag(hash), .slot = s});
    c->count++;
    *slot = s;
    return MM_EOK;
}

static inline void mm_remove(mm_cache *c, int32_t s)
{
    mm_entry *e = &c->e[s];
    mm_node *n = &c->node[s];
    MM_ASSERT(n->state != MM_FREE);
    mm_leave(c, s, -1);
    for (int32_t t = 0; t < MM_NTIERS; t++) {
        if (e->bytes[t] == 0)
            continue;
        int64_t *u = &c->used[mm_entry_counter(c, s, t)];
        *u -= e->bytes[t];
        MM_ASSERT(*u >= 0);
    }
    mm_index_delete(c, mm_index_find_slot(c, s));
    mm_unlink(c, s);
    *n = (mm_node){.next = c->free, .worker = MM_NIL, .state = MM_FREE};
    c->free = s;
    c->count--;
}

/* Recency only: a use is counted by mm_acquire alone, so that a request
 * that made its model load counts once, not once per step of the load. */
static inline void mm_touch(mm_cache *c, int32_t s, double now)
{
    mm_node *n = &c->node[s];
    if (c->tail != s) {
        mm_unlink(c, s);
        mm_link_mru(c, s);
    }
    n->last_use = now;
    n->base = c->inflation;
}

/* The request path's way in: a READY entry is pinned, touched and counted
 * a hit, and its worker returned (MM_NIL if it has none); any other entry
 * is left alone and the answer is MM_NIL. One call in place of entry + pin
 * + touch. */
static inline int32_t mm_acquire(mm_cache *c, int32_t s, double now)
{
    mm_node *n = &c->node[s];
    if (n->state != MM_READY)
        return MM_NIL;
    n->pins++;
    n->hits++;
    mm_touch(c, s, now);
    return n->worker;
}

/* Also the request path's way out (NativeCache.release). */
static inline int mm_unpin(mm_cache *c, int32_t s)
{
    if (c->node[s].pins == 0)
        return MM_EUNPINNED;
    c->node[s].pins--;
    return MM_EOK;
}

static inline int mm_set_state(mm_cache *c, int32_t s, int32_t state)
{
    if (state < MM_LOADING || state > MM_FAILED)
        return MM_ESTATE;
    mm_leave(c, s, -1);
    c->node[s].state = state;
    mm_leave(c, s, +1);
    return MM_EOK;
}

static inline int mm_set_cost(mm_cache *c, int32_t s, double cost)
{
    if (!(cost >= 0.0) || isinf(cost))
        return MM_ECOST;
    c->e[s].cost = cost;
    return MM_EOK;
}

static inline int mm_set_worker(mm_cache *c, int32_t s, int32_t worker)
{
    mm_node *e = &c->node[s];
    int64_t n = c->e[s].bytes[MM_DEVICE];
    if (worker < MM_NIL || worker >= c->workers)
        return MM_EWORKER;
    if (n == 0 || worker == e->worker) {
        e->worker = worker;
        return MM_EOK;
    }
    if (worker == MM_NIL)
        return MM_EDEVICEBYTES;
    int64_t *to = &c->used[MM_DEVICE + worker];
    if (*to > INT64_MAX - n)
        return MM_EOVERFLOW;
    mm_leave(c, s, -1);
    c->used[MM_DEVICE + e->worker] -= n;
    MM_ASSERT(c->used[MM_DEVICE + e->worker] >= 0);
    *to += n;
    e->worker = worker;
    mm_leave(c, s, +1);
    return MM_EOK;
}

static inline int mm_set_bytes(mm_cache *c, int32_t s, int32_t tier, int64_t n)
{
    mm_entry *e = &c->e[s];
    if (tier < 0 || tier >= MM_NTIERS)
        return MM_ETIER;
    if (n < 0)
        return MM_ENEGATIVE;
    if (tier == MM_DEVICE && c->node[s].worker == MM_NIL)
        return n == 0 ? MM_EOK : MM_ENOWORKER;
    int64_t *u = &c->used[mm_entry_counter(c, s, tier)];
    int64_t rest = *u - e->bytes[tier];
    MM_ASSERT(rest >= 0);
    if (rest > INT64_MAX - n)
        return MM_EOVERFLOW;
    mm_leave(c, s, -1);
    *u = rest + n;
    e->bytes[tier] = n;
    mm_leave(c, s, +1);
    return MM_EOK;
}

static inline int mm_set_capacity(mm_cache *c, int32_t tier, int32_t worker,
                                  int64_t n)
{
    int32_t k = mm_counter(c, tier, worker);
    if (k < 0)
        return -k;
    if (n < 0)
        return MM_ENEGATIVE;
    c->cap[k] = n;
    return MM_EOK;
}

static inline int mm_is_candidate(const mm_cache *c, int32_t s, int32_t tier,
                                  int32_t worker)
{
    const mm_node *n = &c->node[s];
    return n->state == MM_READY && n->pins == 0 && c->e[s].bytes[tier] > 0
           && (tier != MM_DEVICE || n->worker == worker);
}

static int mm_pick_cmp(const void *a, const void *b)
{
    const mm_pick *x = a, *y = b;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

/* Chooses what to evict from (tier, worker) to fit `need` more bytes: the
 * answer is c->picks[0 .. *n), the reason goes to *reason. LRU walks from
 * the LRU end and costs O(victims + skipped entries); GDSF gathers every
 * candidate and sorts them by (H, LRU position), O(n log n). Changes
 * nothing except GDSF's inflation L, raised to the largest H evicted, and
 * not that when `peek` (a caller comparing workers before it picks one). */
static inline int mm_victims(mm_cache *c, int32_t tier, int32_t worker,
                             int64_t need, double high, double low, int peek,
                             int32_t *n, int32_t *reason)
{
    int32_t k = mm_counter(c, tier, worker);
    *n = 0;
    *reason = MM_OK;
    if (k < 0)
        return -k;
    if (need < 0)
        return MM_ENEGATIVE;
    if (!(low >= 0.0 && low <= high) || isinf(high))
        return MM_EWATERMARK;
    int64_t used = c->used[k], cap = c->cap[k], freed = 0;
    if (tier == MM_DEVICE)
        used -= c->leaving[worker]; /* gone by the time a load sent now runs */
    if (need > cap) {
        *reason = MM_TOO_LARGE;
        return MM_EOK;
    }
    if (!mm_over(used, need, high, cap))
        return MM_EOK;

    int32_t m = 0, rank = 0;
    for (int32_t s = c->head; s != MM_NIL; s = c->node[s].next, rank++) {
        const mm_entry *e = &c->e[s];
        if (!mm_is_candidate(c, s, tier, worker))
            continue;
        c->picks[m++] = (mm_pick){.h = 0.0, .rank = rank, .slot = s};
        if (c->policy == MM_LRU) {
            freed += e->bytes[tier];
            if (!mm_over(used - freed, need, low, cap))
                break;
        } else {
            c->picks[m - 1].h = mm_priority(c, s);
        }
    }
    if (c->policy == MM_GDSF && m > 0) { /* picks is NULL before the first insert */
        qsort(c->picks, (size_t)m, sizeof(mm_pick), mm_pick_cmp);
        int32_t all = m;
        for (m = 0; m < all;) {
            freed += c->e[c->picks[m++].slot].bytes[tier];
            if (!mm_over(used - freed, need, low, cap))
                break;
        }
    }
    MM_ASSERT(freed <= used);
    /* (used - freed) + need <= cap, written so that it cannot overflow. */
    if (mm_over(used - freed, need, low, cap) && used - freed > cap - need) {
        *reason = MM_PINNED;
        return MM_EOK;
    }
    if (c->policy == MM_GDSF && !peek && m > 0 && c->picks[m - 1].h > c->inflation)
        c->inflation = c->picks[m - 1].h;
    *n = m;
    return MM_EOK;
}

/* READY, unpinned entries holding bytes or a worker (a model that measured
 * 0 bytes is still loaded there) and unused since now - idle_s, into
 * c->picks[0 .. *n), least recent first. Stops at the first entry used
 * later than that: callers touch with a clock that does not go back. */
static inline int32_t mm_idle(mm_cache *c, double now, double idle_s)
{
    double since = now - idle_s;
    int32_t m = 0;
    for (int32_t s = c->head; s != MM_NIL; s = c->node[s].next) {
        const mm_entry *e = &c->e[s];
        const mm_node *n = &c->node[s];
        if (n->last_use > since)
            break;
        if (n->state == MM_READY && n->pins == 0
            && (e->bytes[MM_HOST] | e->bytes[MM_DISK] | e->bytes[MM_DEVICE]
                || n->worker != MM_NIL))
            c->picks[m++].slot = s;
    }
    return m;
}

/* Walks everything (O(n)) and checks the list, the free list, the index
 * and every counter against the entries: for tests and debugging. */
static inline int mm_verify(const mm_cache *c)
{
    int32_t seen = 0, prev = MM_NIL, err = MM_ECORRUPT;
    int64_t *sums = calloc((size_t)c->workers + 2, sizeof(int64_t));
    int64_t *leaving = calloc((size_t)c->workers + 1, sizeof(int64_t));
    if (!sums || !leaving) {
        free(sums);
        free(leaving);
        return MM_ENOMEM;
    }
    for (int32_t s = c->head; s != MM_NIL; prev = s, s = c->node[s].next) {
        const mm_entry *e = &c->e[s];
        const mm_node *n = &c->node[s];
        if (s < 0 || s >= c->n_slots || n->state < MM_LOADING
            || n->state > MM_FAILED || n->prev != prev
            || ++seen > c->count || n->pins < 0
            || n->worker < MM_NIL || n->worker >= c->workers
            || (n->worker == MM_NIL && e->bytes[MM_DEVICE] != 0))
            goto out;
        for (int32_t t = 0; t < MM_NTIERS; t++) {
            if (e->bytes[t] < 0)
                goto out;
            if (e->bytes[t])
                sums[mm_entry_counter(c, s, t)] += e->bytes[t];
        }
        if (n->state == MM_UNLOADING && n->worker != MM_NIL)
            leaving[n->worker] += e->bytes[MM_DEVICE];
    }
    if (seen != c->count || prev != c->tail)
        goto out;
    for (int32_t s = c->free; s != MM_NIL; s = c->node[s].next)
        if (s < 0 || s >= c->n_slots || c->node[s].state != MM_FREE
            || c->node[s].key || ++seen > c->n_slots)
            goto out;
    if (seen != c->n_slots)
        goto out;
    /* The index: a power of two at most 3/4 full, one bucket per live slot,
     * under the slot's tag, each reached from its home without a hole. */
    uint64_t size = (uint64_t)c->mask + 1, indexed = 0;
    if ((size & (size - 1)) || size < MM_INDEX_MIN
        || c->shift != 32 - (uint32_t)__builtin_ctzll(size)
        || 4 * (uint64_t)c->count > 3 * size)
        goto out;
    for (uint32_t i = 0; i <= c->mask; i++) {
        mm_bucket b = c->index[i];
        if (b.slot == MM_NIL)
            continue;
        if (b.slot < 0 || b.slot >= c->n_slots
            || c->node[b.slot].state == MM_FREE
            || mm_tag(c->node[b.slot].hash) != b.tag
            || ++indexed > (uint64_t)c->count)
            goto out;
        for (uint32_t j = mm_index_home(c, b.tag); j != i; j = (j + 1) & c->mask)
            if (c->index[j].slot == MM_NIL)
                goto out;
    }
    if (indexed != (uint64_t)c->count)
        goto out;
    for (int32_t s = c->head; s != MM_NIL; s = c->node[s].next) {
        uint32_t i = mm_index_home(c, mm_tag(c->node[s].hash));
        while (c->index[i].slot != s) {
            if (c->index[i].slot == MM_NIL)
                goto out;
            i = (i + 1) & c->mask;
        }
    }
    err = MM_EOK;
    for (int32_t k = 0; k < MM_DEVICE + c->workers; k++)
        if (sums[k] != c->used[k])
            err = MM_ECORRUPT;
    for (int32_t w = 0; w < c->workers; w++)
        if (leaving[w] != c->leaving[w])
            err = MM_ECORRUPT;
out:
    free(sums);
    free(leaving);
    return err;
}

#endif
