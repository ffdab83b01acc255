/* The model cache's accounting core: plain C, no Python.
 *
 * An entry is named by its slot and lives in two parallel arrays: node[s]
 * holds what a touch reads and writes (the LRU links, hits, last use), e[s]
 * the rest. A touch, the hot path, then relinks and stamps three 32-byte
 * nodes, cache-line aligned, and reads no entry. The links make a doubly
 * linked list in LRU order (head = least recently used); free slots are
 * chained through `next`. Byte counters are kept per tier: host, disk, then
 * one device counter per worker. Every operation except the walks (victims,
 * idle, verify) is O(1).
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

typedef struct {
    int32_t prev, next;       /* slots; MM_NIL at the ends */
    int64_t hits;
    double last_use;
    double base;              /* GDSF: the inflation L at insert or last hit */
} mm_node;

typedef struct {
    int64_t bytes[MM_NTIERS]; /* device bytes count on `worker` */
    int64_t pins;
    double cost;
    int32_t worker;           /* MM_NIL: none, and then bytes[MM_DEVICE] == 0 */
    int32_t state;            /* MM_FREE while the slot is on the free list */
} mm_entry;

/* One victims/idle answer row; `rank` (LRU position) breaks GDSF ties. */
typedef struct {
    double h;
    int32_t rank;
    int32_t slot;
} mm_pick;

typedef struct {
    mm_node *node;            /* n_slots long, 64-byte aligned */
    mm_entry *e;              /* n_slots long */
    mm_pick *picks;           /* n_slots long, so an answer always fits */
    int64_t *used, *cap;      /* [host, disk, device of worker 0, 1, ...] */
    double inflation;         /* GDSF L: the largest H evicted so far */
    int32_t n_slots, count;
    int32_t head, tail, free;
    int32_t workers, policy;
} mm_cache;

static inline int mm_cache_init(mm_cache *c, int32_t workers, int32_t policy)
{
    *c = (mm_cache){.head = MM_NIL, .tail = MM_NIL, .free = MM_NIL};
    if (workers < 0)
        return MM_EWORKER;
    if (policy != MM_LRU && policy != MM_GDSF)
        return MM_EPOLICY;
    c->workers = workers;
    c->policy = policy;
    c->used = calloc((size_t)workers + 2, sizeof(int64_t));
    c->cap = calloc((size_t)workers + 2, sizeof(int64_t));
    return c->used && c->cap ? MM_EOK : MM_ENOMEM;
}

static inline void mm_cache_free(mm_cache *c)
{
    free(c->node);
    free(c->e);
    free(c->picks);
    free(c->used);
    free(c->cap);
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

static inline int32_t mm_entry_counter(const mm_entry *e, int32_t tier)
{
    return tier == MM_DEVICE ? MM_DEVICE + e->worker : tier;
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
 * entry was inserted or last hit. Computed when asked, so a size or cost
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

/* Doubles the slot array; on failure the cache is unchanged. */
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
        c->e[s].state = MM_FREE;
        c->node[s].next = c->free;
        c->free = s;
    }
    c->n_slots = hi;
    return MM_EOK;
}

/* A new entry at the MRU end; its slot goes to *slot. */
static inline int mm_insert(mm_cache *c, int32_t state, int32_t worker,
                            int32_t *slot)
{
    if (state < MM_LOADING || state > MM_FAILED)
        return MM_ESTATE;
    if (worker < MM_NIL || worker >= c->workers)
        return MM_EWORKER;
    if (c->free == MM_NIL) {
        int err = mm_grow(c);
        if (err)
            return err;
    }
    int32_t s = c->free;
    mm_entry *e = &c->e[s];
    MM_ASSERT(e->state == MM_FREE);
    c->free = c->node[s].next;
    *e = (mm_entry){.cost = 1.0, .worker = worker, .state = state};
    c->node[s] = (mm_node){.base = c->inflation};
    mm_link_mru(c, s);
    c->count++;
    *slot = s;
    return MM_EOK;
}

static inline void mm_remove(mm_cache *c, int32_t s)
{
    mm_entry *e = &c->e[s];
    MM_ASSERT(e->state != MM_FREE);
    for (int32_t t = 0; t < MM_NTIERS; t++) {
        if (e->bytes[t] == 0)
            continue;
        int64_t *u = &c->used[mm_entry_counter(e, t)];
        *u -= e->bytes[t];
        MM_ASSERT(*u >= 0);
    }
    mm_unlink(c, s);
    e->state = MM_FREE;
    c->node[s].next = c->free;
    c->free = s;
    c->count--;
}

static inline void mm_touch(mm_cache *c, int32_t s, double now)
{
    mm_node *n = &c->node[s];
    if (c->tail != s) {
        mm_unlink(c, s);
        mm_link_mru(c, s);
    }
    n->hits++;
    n->last_use = now;
    n->base = c->inflation;
}

/* The request path's way in: a READY entry is pinned and touched and its
 * worker returned (MM_NIL if it has none); any other entry is left alone
 * and the answer is MM_NIL. One call in place of entry + pin + touch. */
static inline int32_t mm_acquire(mm_cache *c, int32_t s, double now)
{
    mm_entry *e = &c->e[s];
    if (e->state != MM_READY)
        return MM_NIL;
    e->pins++;
    mm_touch(c, s, now);
    return e->worker;
}

/* Also the request path's way out (NativeCache.release). */
static inline int mm_unpin(mm_cache *c, int32_t s)
{
    if (c->e[s].pins == 0)
        return MM_EUNPINNED;
    c->e[s].pins--;
    return MM_EOK;
}

static inline int mm_set_state(mm_cache *c, int32_t s, int32_t state)
{
    if (state < MM_LOADING || state > MM_FAILED)
        return MM_ESTATE;
    c->e[s].state = state;
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
    mm_entry *e = &c->e[s];
    int64_t n = e->bytes[MM_DEVICE];
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
    c->used[MM_DEVICE + e->worker] -= n;
    MM_ASSERT(c->used[MM_DEVICE + e->worker] >= 0);
    *to += n;
    e->worker = worker;
    return MM_EOK;
}

static inline int mm_set_bytes(mm_cache *c, int32_t s, int32_t tier, int64_t n)
{
    mm_entry *e = &c->e[s];
    if (tier < 0 || tier >= MM_NTIERS)
        return MM_ETIER;
    if (n < 0)
        return MM_ENEGATIVE;
    if (tier == MM_DEVICE && e->worker == MM_NIL)
        return n == 0 ? MM_EOK : MM_ENOWORKER;
    int64_t *u = &c->used[mm_entry_counter(e, tier)];
    int64_t rest = *u - e->bytes[tier];
    MM_ASSERT(rest >= 0);
    if (rest > INT64_MAX - n)
        return MM_EOVERFLOW;
    *u = rest + n;
    e->bytes[tier] = n;
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

static inline int mm_is_candidate(const mm_entry *e, int32_t tier,
                                  int32_t worker)
{
    return e->state == MM_READY && e->pins == 0 && e->bytes[tier] > 0
           && (tier != MM_DEVICE || e->worker == worker);
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
 * nothing except GDSF's inflation L, raised to the largest H evicted. */
static inline int mm_victims(mm_cache *c, int32_t tier, int32_t worker,
                             int64_t need, double high, double low,
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
    if (need > cap) {
        *reason = MM_TOO_LARGE;
        return MM_EOK;
    }
    if (!mm_over(used, need, high, cap))
        return MM_EOK;

    int32_t m = 0, rank = 0;
    for (int32_t s = c->head; s != MM_NIL; s = c->node[s].next, rank++) {
        const mm_entry *e = &c->e[s];
        if (!mm_is_candidate(e, tier, worker))
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
    if (c->policy == MM_GDSF) {
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
    if (c->policy == MM_GDSF && m > 0 && c->picks[m - 1].h > c->inflation)
        c->inflation = c->picks[m - 1].h;
    *n = m;
    return MM_EOK;
}

/* READY, unpinned entries holding bytes and unused since now - idle_s,
 * into c->picks[0 .. *n), least recent first. Stops at the first entry used
 * later than that: callers touch with a clock that does not go back. */
static inline int32_t mm_idle(mm_cache *c, double now, double idle_s)
{
    double since = now - idle_s;
    int32_t m = 0;
    for (int32_t s = c->head; s != MM_NIL; s = c->node[s].next) {
        const mm_entry *e = &c->e[s];
        if (c->node[s].last_use > since)
            break;
        if (e->state == MM_READY && e->pins == 0
            && (e->bytes[MM_HOST] | e->bytes[MM_DISK] | e->bytes[MM_DEVICE]))
            c->picks[m++].slot = s;
    }
    return m;
}

/* Walks everything (O(n)) and checks the list, the free list and every
 * counter against the entries: for tests and debugging. */
static inline int mm_verify(const mm_cache *c)
{
    int32_t seen = 0, prev = MM_NIL, err = MM_ECORRUPT;
    int64_t *sums = calloc((size_t)c->workers + 2, sizeof(int64_t));
    if (!sums)
        return MM_ENOMEM;
    for (int32_t s = c->head; s != MM_NIL; prev = s, s = c->node[s].next) {
        const mm_entry *e = &c->e[s];
        if (s < 0 || s >= c->n_slots || e->state == MM_FREE
            || c->node[s].prev != prev
            || ++seen > c->count || e->pins < 0
            || (e->worker == MM_NIL && e->bytes[MM_DEVICE] != 0))
            goto out;
        for (int32_t t = 0; t < MM_NTIERS; t++) {
            if (e->bytes[t] < 0)
                goto out;
            if (e->bytes[t])
                sums[mm_entry_counter(e, t)] += e->bytes[t];
        }
    }
    if (seen != c->count || prev != c->tail)
        goto out;
    for (int32_t s = c->free; s != MM_NIL; s = c->node[s].next)
        if (c->e[s].state != MM_FREE || ++seen > c->n_slots)
            goto out;
    if (seen != c->n_slots)
        goto out;
    err = MM_EOK;
    for (int32_t k = 0; k < MM_DEVICE + c->workers; k++)
        if (sums[k] != c->used[k])
            err = MM_ECORRUPT;
out:
    free(sums);
    return err;
}

#endif
