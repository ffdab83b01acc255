/* A single-producer single-consumer ring of variable-length records in a
 * shared-memory segment. Plain C11: no Python in here. The layout, the record
 * format and the publication order are specified in mmengine/ring.py, whose
 * pure-Python twin reads and writes the very same bytes.
 *
 * Memory ordering: the producer writes a record, then publishes it with a
 * release store of `tail`; the consumer reads `tail` with an acquire load
 * before it reads the record, and hands the space back with a release store
 * of `head`. Parking is a Dekker handshake: the waiter stores its parked flag,
 * fences, and re-checks the counter; the other side stores the counter,
 * fences, and reads the flag. With a seq_cst fence on both sides at least one
 * of them sees the other's store, so a wake-up is never lost and a busy ring
 * makes no system call.
 */
#ifndef MMENGINE_RING_H
#define MMENGINE_RING_H

#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdlib.h>
#include <poll.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "debug.h"

#define MM_RING_MAGIC 0x31304752494d4d4dULL /* "MMMRIG01" little-endian */
#define MM_RING_VERSION 1u
#define MM_RING_HEADER_BYTES 4096u /* records start page-aligned */
#define MM_RING_ALIGN 8u
#define MM_RING_WRAP 0xffffffffu    /* nparts of a wrap marker */
#define MM_RING_MAX_PARTS 64u

/* `closed` is two bytes, one per side, read together as a u32: each side
 * writes only its own byte, so closing needs no read-modify-write. */
#define MM_RING_CREATOR_CLOSED 0x1u
#define MM_RING_ATTACHER_CLOSED 0x100u

enum mm_ring_status {
    MM_RING_OK = 0,
    MM_RING_AGAIN = 1,     /* full (put) or empty (get): try again */
    MM_RING_TOO_BIG = 2,   /* the record can never fit; nothing written */
    MM_RING_CLOSED = 3,    /* the peer closed its end */
    MM_RING_TIMEOUT = 4,
    MM_RING_PEER_DIED = 5, /* the peer's pidfd reported its exit */
    MM_RING_ERRNO = 6,     /* a system call failed; see errno */
    MM_RING_CORRUPT = 7,   /* the peer wrote what is no record: nothing more can be read */
};

/* The shared header. Each counter and each parked flag has a cache line of
 * its own so that the producer's and the consumer's stores never share one. */
typedef struct {
    uint64_t magic;
    uint32_t version;
    _Atomic uint32_t closed;
    uint64_t capacity;
    _Atomic int32_t creator_pid;
    _Atomic int32_t attacher_pid;
    uint8_t _pad0[64 - 32];
    _Atomic uint64_t tail; /* bytes ever published; producer's line */
    _Atomic uint32_t producer_cpu; /* 1 + the CPU of its last publish; 0: unknown */
    uint8_t _pad1[52];
    _Atomic uint64_t head; /* bytes ever released; consumer's line */
    _Atomic uint32_t consumer_cpu; /* 1 + the CPU of its last release; 0: unknown */
    uint8_t _pad2a[4];
    /* Records ever handed out (not wrap markers): where a dead consumer
     * stopped reading, so that its producer knows which records it never
     * saw (a worker's front-end sends those again elsewhere). */
    _Atomic uint64_t taken;
    uint8_t _pad2[40];
    _Atomic uint32_t consumer_parked;
    _Atomic uint32_t consumer_backoffs; /* mm_ring_preempted's count, consumer's */
    uint8_t _pad3[56];
    _Atomic uint32_t producer_parked;
    _Atomic uint32_t producer_backoffs;
    uint8_t _pad4[56];
} mm_ring_header;
_Static_assert(offsetof(mm_ring_header, tail) == 64 && offsetof(mm_ring_header, head) == 128 &&
                   offsetof(mm_ring_header, taken) == 144 &&
                   offsetof(mm_ring_header, consumer_parked) == 192 &&
                   offsetof(mm_ring_header, producer_parked) == 256,
               "the layout mmengine/ring.py specifies");

/* A waiter that waited this long for a CPU while runnable since its last
 * wait began shares its CPU with another busy process: between two waits
 * a neighbour's time slice takes that long (4 ms here). The turns of its
 * own peers, where a client, a front-end and a worker share two cores,
 * came to 250 us about once in 700 waits, and to this twice at most in
 * 20,000.
 * Spinning, a waiter is runnable but never woken when its record comes,
 * and waits behind that process for the rest of its time slice; and
 * having spun, it is the one the scheduler preempts, in the middle of
 * its next call too. Parked, it is woken, and the kernel runs a woken
 * sleeper ahead of a busy process. */
#define MM_RING_PREEMPTED_NS 1000000ull
/* ...and for a 1/MM_RING_TAKEN_SHARE share or more of the time since it
 * last looked: a neighbour's slices take half of it or more, where the
 * waits of a thread that slept for seconds between two looks (a timer's
 * turn now and then) add up to a millisecond of a long while. */
#define MM_RING_TAKEN_SHARE 4u
/* ...in waits of this long or more, on average, each time it got the CPU
 * back: a busy neighbour's time slices, milliseconds each. Not the turns
 * of a peer it woke, a client beside a front-end that answered it (10-20
 * us each, a quarter of a polling front-end's time or more), nor those of
 * a daemon that wakes often and runs briefly: the front-end's answer waits
 * out such a turn, not a time slice, and sleeping would only add a wake-up. */
#define MM_RING_TURN_NS 100000ull
/* Taken twice within this many spinning waits, the CPU is contended (once
 * is a blip: a daemon's burst, the neighbour of a moment). */
#define MM_RING_CONTENDED_WITHIN 64u
/* How long it then parks at once instead of spinning: the first time,
 * and doubled each time it finds the CPU taken again during a back-off or
 * within its length after, up to the most. */
#define MM_RING_BACKOFF_NS 50000000ull
#define MM_RING_MAX_BACKOFF_NS 1000000000ull

/* One process's view of a ring: its mapping, its eventfds, its role. */
typedef struct {
    mm_ring_header *hdr;
    uint8_t *data;
    uint64_t cap;
    uint64_t mask;
    int data_fd;   /* written by the producer to wake a parked consumer */
    int space_fd;  /* written by the consumer to wake a parked producer */
    uint32_t peer_closed_bit;
    uint64_t held;  /* bytes of the records get() handed out, not yet released */
    /* Bytes the producer wrote after `tail` and holds back (a put with
     * `hold`) until a put without it, a publish, or a put that finds no
     * room: records meant to be read together appear together. */
    uint64_t unpublished;
    uint64_t spin_ns;
    /* The other side's counter as last read: a lower bound, since counters
     * only grow. The producer reads `head` again only when this bound shows
     * too little room, the consumer reads `tail` again only when it has
     * caught up with this bound; so a counter's cache line is not pulled
     * across cores on every record, only when its owner's news is needed. */
    uint64_t head_seen; /* producer */
    uint64_t tail_seen; /* consumer */
    /* The parts of the record mm_ring_try_get() last handed out, as it
     * checked them: the peer may write the shared copy again meanwhile. */
    uint32_t rec_nparts;
    uint32_t rec_lens[MM_RING_MAX_PARTS];
    int corrupt; /* the consumer found what is no record: it reads no more */
    /* Work a waiter may do between its looks (a worker's serving thread:
     * the part of a load, csrc/readjob.h): 1 if it did some. Set before
     * the ring is waited on; NULL: none. */
    int (*idle_step)(void *);
    void *idle_arg;
    /* The waiter's back-off (mm_ring_preempted): it spins again from
     * spin_from (mm_now_ns()); backoff_ns, the last one's length; its
     * waits that spun, and how many it had when its CPU was last taken. */
    uint64_t spin_from;
    uint64_t backoff_ns;
    uint64_t spun;
    uint64_t spun_taken;
    /* Its looks (mm_ring_cpu_taken): whether it has looked, when, its time
     * waiting for a CPU then and its time slices, and its thread's
     * scheduler statistics (an open file: -1 none yet, -2 none to be had)
     * and that thread's id. */
    int looked;
    uint64_t looked_ns;
    uint64_t runq_ns;
    uint64_t slices;
    int schedstat_fd;
    pid_t schedstat_tid;
} mm_ring;

static inline uint64_t mm_align8(uint64_t n) { return (n + 7u) & ~(uint64_t)7u; }

/* How long a waiter spins: another thread of the process may change it
 * while this one waits (a worker spins less while it loads a model). */
static inline uint64_t mm_ring_spin(const mm_ring *r) {
    return __atomic_load_n(&r->spin_ns, __ATOMIC_RELAXED);
}

static inline void mm_ring_set_spin(mm_ring *r, uint64_t spin_ns) {
    __atomic_store_n(&r->spin_ns, spin_ns, __ATOMIC_RELAXED);
}

/* UINT64_MAX for parts whose sum no ring could hold (nor a u64). */
static inline uint64_t mm_ring_record_size(uint32_t nparts, const uint64_t *lens) {
    uint64_t size = 8u + mm_align8(4u * (uint64_t)nparts);
    for (uint32_t i = 0; i < nparts; i++) {
        if (lens[i] > 0xfffffff8ull) return UINT64_MAX; /* a record's size is a u32 */
        size += mm_align8(lens[i]);
    }
    return size;
}

static inline uint64_t mm_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* 1 + the CPU this thread runs on (0 where it cannot be told): glibc reads
 * it from rseq or the vDSO, without a system call. */
static inline uint32_t mm_this_cpu(void) {
    int cpu = sched_getcpu();
    return cpu < 0 ? 0u : (uint32_t)cpu + 1u;
}

/* Whether the other side last ran on this thread's CPU: a waiter for it
 * spinning there only holds it off (a ring's two processes share one core
 * when the scheduler puts them so, or on a small machine). `for_read`: the
 * waiter is the consumer, and its peer the producer. */
static inline int mm_ring_peer_here(const mm_ring *r, int for_read) {
    uint32_t peer = atomic_load_explicit(for_read ? &r->hdr->producer_cpu : &r->hdr->consumer_cpu,
                                         memory_order_relaxed);
    return peer != 0 && peer == mm_this_cpu();
}

static inline void mm_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static inline void mm_ring_init_header(void *base, uint64_t cap, int32_t pid) {
    mm_ring_header *h = (mm_ring_header *)base;
    memset(h, 0, sizeof(*h));
    h->magic = MM_RING_MAGIC;
    h->version = MM_RING_VERSION;
    h->capacity = cap;
    atomic_store(&h->creator_pid, pid);
}

static inline void mm_ring_bind(mm_ring *r, void *base, int data_fd, int space_fd,
                                int is_creator, uint64_t spin_ns) {
    r->hdr = (mm_ring_header *)base;
    r->data = (uint8_t *)base + MM_RING_HEADER_BYTES;
    r->cap = r->hdr->capacity;
    r->mask = r->cap - 1;
    r->data_fd = data_fd;
    r->space_fd = space_fd;
    r->peer_closed_bit = is_creator ? MM_RING_ATTACHER_CLOSED : MM_RING_CREATOR_CLOSED;
    r->held = 0;
    r->unpublished = 0;
    r->corrupt = 0;
    r->spin_ns = spin_ns;
    r->idle_step = NULL;
    r->idle_arg = NULL;
    r->spin_from = 0;
    r->backoff_ns = 0;
    r->spun = 0;
    r->spun_taken = 0;
    r->looked = 0;
    r->looked_ns = 0;
    r->runq_ns = 0;
    r->slices = 0;
    r->schedstat_fd = -1;
    r->schedstat_tid = 0;
    r->head_seen = atomic_load_explicit(&r->hdr->head, memory_order_acquire);
    r->tail_seen = atomic_load_explicit(&r->hdr->tail, memory_order_acquire);
}

static inline void mm_efd_signal(int fd) {
    uint64_t one = 1;
    /* EAGAIN means the counter is already non-zero: the waiter will wake. */
    ssize_t rc = write(fd, &one, sizeof(one));
    (void)rc;
}

static inline void mm_efd_drain(int fd) {
    uint64_t v;
    ssize_t rc = read(fd, &v, sizeof(v));
    (void)rc;
}

/* The publishing half of the parking handshake: called right after a
 * counter store, it wakes the other side only if that side said it sleeps. */
static inline void mm_ring_wake(_Atomic uint32_t *parked, int fd) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(parked, memory_order_relaxed)) mm_efd_signal(fd);
}

/* Closes this side's end after every record it published (release): a
 * peer that sees it closed sees those records too. Each side stores only
 * its own byte of `closed`, so closing needs no read-modify-write. */
static inline void mm_ring_close_end(mm_ring *r) {
    int is_creator = r->peer_closed_bit == MM_RING_ATTACHER_CLOSED;
    uint8_t *own = (uint8_t *)&r->hdr->closed + (is_creator ? 0 : 1); /* little-endian */
    __atomic_store_n(own, (uint8_t)1, __ATOMIC_RELEASE);
}

static inline int mm_ring_peer_closed(const mm_ring *r) {
    return (atomic_load_explicit(&r->hdr->closed, memory_order_acquire) & r->peer_closed_bit) != 0;
}

/* Whether `need` bytes are free after `tail`: first by the head last seen,
 * then, only if that is not enough, by the consumer's current head. */
static inline int mm_ring_has_room(mm_ring *r, uint64_t tail, uint64_t need) {
    if (r->cap - (tail - r->head_seen) >= need) return 1;
    r->head_seen = atomic_load_explicit(&r->hdr->head, memory_order_acquire);
    return r->cap - (tail - r->head_seen) >= need;
}

/* Publishes the records written and not yet published (those of puts with
 * `hold`, and a wrap marker), if any, and wakes a parked consumer. */
static inline void mm_ring_publish(mm_ring *r) {
    if (!r->unpublished) return;
    mm_ring_header *h = r->hdr;
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_relaxed) + r->unpublished;
    r->unpublished = 0;
    /* The release store orders every byte written before it. */
    atomic_store_explicit(&h->producer_cpu, mm_this_cpu(), memory_order_relaxed);
    atomic_store_explicit(&h->tail, tail, memory_order_release);
    mm_ring_wake(&h->consumer_parked, r->data_fd);
}

/* No room: what is held back (a wrap marker too) is published first, since
 * only the consumer, reading it, can make the room (a producer waiting on
 * held records would wait for good). */
static inline int mm_ring_no_room(mm_ring *r) {
    mm_ring_publish(r);
    return MM_RING_AGAIN;
}

/* Writes one record made of `nparts` buffers, copying each once, and
 * publishes it with any held before it; `hold`: not yet (mm_ring_publish).
 * Never blocks. A record that does not fit contiguously before the end of
 * the data area is preceded by a wrap marker, published with it, or on its
 * own when the record then finds no room (mm_ring_no_room): so a record as
 * large as the whole ring can always make progress. */
static inline int mm_ring_try_put(mm_ring *r, uint32_t nparts, const uint8_t *const *parts,
                                  const uint64_t *lens, int hold) {
    if (nparts > MM_RING_MAX_PARTS) return MM_RING_TOO_BIG;
    uint64_t size = mm_ring_record_size(nparts, lens);
    if (size > r->cap || size > 0xfffffff8ull) return MM_RING_TOO_BIG;
    if (mm_ring_peer_closed(r)) return MM_RING_CLOSED;

    mm_ring_header *h = r->hdr;
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_relaxed) + r->unpublished;
    uint64_t pos = tail & r->mask;
    if (pos + size > r->cap) {
        uint64_t pad = r->cap - pos;
        if (!mm_ring_has_room(r, tail, pad)) return mm_ring_no_room(r);
        uint32_t *marker = (uint32_t *)(r->data + pos);
        marker[0] = (uint32_t)pad;
        marker[1] = MM_RING_WRAP;
        tail += pad;
        r->unpublished += pad;
        pos = 0;
    }
    if (!mm_ring_has_room(r, tail, size)) return mm_ring_no_room(r);

    uint8_t *p = r->data + pos;
    uint32_t *words = (uint32_t *)p;
    words[0] = (uint32_t)size;
    words[1] = nparts;
    for (uint32_t i = 0; i < nparts; i++) words[2 + i] = (uint32_t)lens[i];
    uint8_t *dst = p + 8u + mm_align8(4u * (uint64_t)nparts);
    for (uint32_t i = 0; i < nparts; i++) {
        if (lens[i]) memcpy(dst, parts[i], lens[i]);
        dst += mm_align8(lens[i]);
    }
    MM_ASSERT((uint64_t)(dst - p) == size);
    r->unpublished += size;
    if (!hold) mm_ring_publish(r);
    return MM_RING_OK;
}

/* Whether the record of `size` bytes (no more than were published) at
 * `pos` of the data area is one a producer could have written: inside the
 * data area, its parts' lengths adding up to its size, each read from the
 * shared copy once and kept in r->rec_lens. A peer that
 * writes anything else (a bug, a native library run amok in a worker) must
 * not make its consumer loop, or read past the mapping. */
static inline int mm_ring_record_fits(mm_ring *r, const uint32_t *words, uint64_t pos,
                                      uint32_t size, uint32_t nparts) {
    uint64_t need = 8u + mm_align8(4u * (uint64_t)nparts);
    if (nparts > MM_RING_MAX_PARTS || need > size || pos + size > r->cap) return 0;
    for (uint32_t i = 0; i < nparts; i++) {
        uint32_t len = __atomic_load_n(&words[2 + i], __ATOMIC_RELAXED);
        r->rec_lens[i] = len;
        need += mm_align8(len);
    }
    r->rec_nparts = nparts;
    return need == size;
}

static inline int mm_ring_corrupt(mm_ring *r) {
    r->corrupt = 1;
    return MM_RING_CORRUPT;
}

/* Finds the next record after those already held, skipping wrap markers,
 * and holds it too: the bytes of every held record stay valid until
 * mm_ring_release() hands them all back at once, so a consumer that drains
 * a burst pays for one release (one store, one fence) instead of one each.
 * MM_RING_CORRUPT where the peer wrote what is not a record. */
static inline int mm_ring_try_get(mm_ring *r, const uint8_t **rec) {
    if (r->corrupt) return MM_RING_CORRUPT;
    mm_ring_header *h = r->hdr;
    uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    for (;;) {
        uint64_t next = head + r->held;
        if (next == r->tail_seen) {
            r->tail_seen = atomic_load_explicit(&h->tail, memory_order_acquire);
            if (next == r->tail_seen) {
                if (!mm_ring_peer_closed(r)) return MM_RING_AGAIN;
                /* The peer closes after its last publish: look once more. */
                r->tail_seen = atomic_load_explicit(&h->tail, memory_order_acquire);
                if (next == r->tail_seen) return MM_RING_CLOSED;
            }
        }
        /* What was published past the records held, and all of it from
         * head: a producer never has more than the capacity in use. */
        uint64_t avail = r->tail_seen - next, pos = next & r->mask;
        if (r->tail_seen - head > r->cap || avail > r->cap || avail < 8u || (next & 7u))
            return mm_ring_corrupt(r);
        const uint8_t *p = r->data + pos;
        const uint32_t *words = (const uint32_t *)p;
        uint32_t size = __atomic_load_n(&words[0], __ATOMIC_RELAXED);
        uint32_t nparts = __atomic_load_n(&words[1], __ATOMIC_RELAXED);
        if (size < 8u || (size & 7u) || size > avail) return mm_ring_corrupt(r);
        if (nparts == MM_RING_WRAP) {
            /* It pads to the end, from anywhere but the start. */
            if (size != r->cap - pos || pos == 0) return mm_ring_corrupt(r);
            if (r->held) {
                r->held += size; /* freed with the records before it */
                continue;
            }
            head += size;
            atomic_store_explicit(&h->head, head, memory_order_release);
            mm_ring_wake(&h->producer_parked, r->space_fd);
            continue;
        }
        if (!mm_ring_record_fits(r, words, pos, size, nparts)) return mm_ring_corrupt(r);
        r->held += size;
        /* The consumer alone writes it: no read-modify-write needed. */
        atomic_store_explicit(&h->taken, atomic_load_explicit(&h->taken, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        *rec = p;
        return MM_RING_OK;
    }
}

static inline void mm_ring_release(mm_ring *r) {
    mm_ring_header *h = r->hdr;
    MM_ASSERT(r->held != 0);
    uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    atomic_store_explicit(&h->consumer_cpu, mm_this_cpu(), memory_order_relaxed);
    atomic_store_explicit(&h->head, head + r->held, memory_order_release);
    r->held = 0;
    mm_ring_wake(&h->producer_parked, r->space_fd);
}

/* -- waiting --------------------------------------------------------------- */

static inline int mm_ring_readable(const mm_ring *r) {
    return atomic_load_explicit(&r->hdr->tail, memory_order_acquire) !=
               atomic_load_explicit(&r->hdr->head, memory_order_relaxed) + r->held ||
           mm_ring_peer_closed(r);
}

static inline int mm_ring_writable(const mm_ring *r, uint64_t need) {
    uint64_t used = atomic_load_explicit(&r->hdr->tail, memory_order_relaxed) -
                    atomic_load_explicit(&r->hdr->head, memory_order_acquire);
    return r->cap - used >= need || mm_ring_peer_closed(r);
}

/* Announces that this side is about to sleep on its eventfd. Returns 1 if it
 * may sleep (still nothing to do), 0 if the condition already holds, in which
 * case the flag is cleared again. An asyncio consumer calls this before it
 * returns to the loop, and mm_ring_unpark() when its reader fires. */
static inline int mm_ring_park(mm_ring *r, int for_read, uint64_t need) {
    _Atomic uint32_t *flag = for_read ? &r->hdr->consumer_parked : &r->hdr->producer_parked;
    atomic_store_explicit(flag, 1u, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst);
    int ready = for_read ? mm_ring_readable(r) : mm_ring_writable(r, need);
    if (ready) atomic_store_explicit(flag, 0u, memory_order_relaxed);
    return !ready;
}

static inline void mm_ring_unpark(mm_ring *r, int for_read) {
    _Atomic uint32_t *flag = for_read ? &r->hdr->consumer_parked : &r->hdr->producer_parked;
    atomic_store_explicit(flag, 0u, memory_order_relaxed);
    mm_efd_drain(for_read ? r->data_fd : r->space_fd);
}

/* The waiter found its CPU taken (MM_RING_PREEMPTED_NS): whether it backs
 * off. Taken again within MM_RING_CONTENDED_WITHIN of its spinning waits
 * (or while it backs off), it parks at once for a while, longer each time
 * it finds it taken again during or soon after a back-off, and counts it
 * in the shared header, where the other side can read it; else it goes on
 * spinning. */
static inline int mm_ring_preempted(mm_ring *r, int for_read, uint64_t now) {
    int contended = r->spun_taken && r->spun - r->spun_taken < MM_RING_CONTENDED_WITHIN;
    r->spun_taken = r->spun;
    if (!contended) return 0;
    int again = r->backoff_ns && (now < r->spin_from || now - r->spin_from < r->backoff_ns);
    r->backoff_ns = !again ? MM_RING_BACKOFF_NS
                    : r->backoff_ns >= MM_RING_MAX_BACKOFF_NS / 2 ? MM_RING_MAX_BACKOFF_NS
                    : 2 * r->backoff_ns;
    r->spin_from = now + r->backoff_ns;
    atomic_fetch_add_explicit(for_read ? &r->hdr->consumer_backoffs : &r->hdr->producer_backoffs,
                              1u, memory_order_relaxed);
    return 1;
}

/* The calling thread's time runnable but waiting for a CPU, in ns, into
 * `runq`, and the times it got a CPU (its time slices) into `slices`: the
 * scheduler's statistics, from a file of the thread's own that r keeps
 * open (opened again by another thread, or in a forked child: its looks
 * start over); -1 where they cannot be read (the kernel keeps none). Not
 * its sleeps (a park, the GIL's), nor a stall of the hypervisor's (here
 * 250-450 us about once a second), which no back-off helps: the kernel
 * counts those as run. */
static inline int mm_ring_sched(mm_ring *r, uint64_t *runq, uint64_t *slices) {
    pid_t tid = gettid();
    if (r->schedstat_tid != tid && r->schedstat_fd != -2) {
        if (r->schedstat_fd >= 0) close(r->schedstat_fd);
        r->schedstat_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
        if (r->schedstat_fd < 0) r->schedstat_fd = -2;
        r->schedstat_tid = tid;
        r->looked = 0; /* another thread's figures: nothing to compare */
    }
    if (r->schedstat_fd < 0) return -1;
    char buf[96], *end;
    ssize_t n = pread(r->schedstat_fd, buf, sizeof(buf) - 1, 0);
    if (n <= 0) return -1;
    buf[n] = 0;
    const char *waited = strchr(buf, ' '); /* "ran waited slices" */
    if (!waited) return -1;
    *runq = strtoull(waited + 1, &end, 10);
    *slices = strtoull(end, &end, 10);
    return *end == '\n' || *end == 0 ? 0 : -1;
}

/* Whether another thread took the waiter's CPU for MM_RING_PREEMPTED_NS,
 * MM_RING_TAKEN_SHARE of the time and MM_RING_TURN_NS a slice since its
 * last wait began (`now`), in its spin or in its work since: a wait that
 * begins looks (one read of its statistics, ~0.4 us, while it has nothing
 * to do). A look whose figures cannot be read starts the looks over. */
static inline int mm_ring_cpu_taken(mm_ring *r, uint64_t now) {
    uint64_t runq, slices;
    if (mm_ring_sched(r, &runq, &slices) < 0) {
        r->looked = 0;
        return 0;
    }
    uint64_t waited = runq - r->runq_ns, got_back = slices - r->slices;
    int taken = r->looked && waited >= MM_RING_PREEMPTED_NS
                && waited * MM_RING_TAKEN_SHARE >= now - r->looked_ns
                && waited >= MM_RING_TURN_NS * (got_back ? got_back : 1);
    r->looked = 1;
    r->looked_ns = now;
    r->runq_ns = runq;
    r->slices = slices;
    return taken;
}

/* Closes what mm_ring_sched opened. */
static inline void mm_ring_unbind(mm_ring *r) {
    if (r->schedstat_fd >= 0) close(r->schedstat_fd);
    r->schedstat_fd = -1;
    r->schedstat_tid = 0;
}

/* Records the consumer has got. Read by the producer once the consumer's
 * process has exited (nothing to order it against then). */
static inline uint64_t mm_ring_taken(const mm_ring *r) {
    return atomic_load_explicit(&r->hdr->taken, memory_order_relaxed);
}

/* The consumer's back-offs (for_read) or the producer's, modulo 2**32. */
static inline uint32_t mm_ring_backoffs(const mm_ring *r, int for_read) {
    return atomic_load_explicit(for_read ? &r->hdr->consumer_backoffs : &r->hdr->producer_backoffs,
                                memory_order_relaxed);
}

/* Blocks until the ring is readable (for_read) or has `need` free bytes, for
 * at most timeout_ns (negative: no limit). Spins for spin_ns first, then
 * parks on the eventfd; a peer pidfd (or -1) turns the peer's exit into
 * MM_RING_PEER_DIED instead of a hang. A waiter that spins looks first
 * whether its CPU was taken (mm_ring_cpu_taken); while it backs off
 * (mm_ring_preempted) it parks at once. Safe to call without the GIL. */
static inline int mm_ring_wait(mm_ring *r, int for_read, uint64_t need, int64_t timeout_ns,
                               int peer_pidfd) {
#define MM_READY() (for_read ? mm_ring_readable(r) : mm_ring_writable(r, need))
    if (MM_READY()) return MM_RING_OK;
    uint64_t start = mm_now_ns();
    uint64_t spin_ns = mm_ring_spin(r);
    if (spin_ns && mm_ring_cpu_taken(r, start)) mm_ring_preempted(r, for_read, start);
    if (start < r->spin_from) spin_ns = 0;
    if (timeout_ns >= 0 && spin_ns > (uint64_t)timeout_ns) spin_ns = (uint64_t)timeout_ns;
    if (spin_ns) r->spun++;
    uint64_t spin_end = start + spin_ns;
    uint64_t yield_after = start + spin_ns / 8;
    /* Two processes of a ring can share one core on a small machine: then
     * spinning only delays the peer we wait for. A waiter yields at once
     * where the peer last ran on its CPU, else only after a while: a system
     * call while the answer arrives costs more than the round trip it
     * would save. */
    int here = mm_ring_peer_here(r, for_read);
    for (unsigned i = 1;; i++) {
        if (MM_READY()) return MM_RING_OK;
        if (r->idle_step != NULL && r->idle_step(r->idle_arg)) {
            uint64_t now = mm_now_ns();
            if (timeout_ns >= 0 && now - start >= (uint64_t)timeout_ns) break; /* still bounded */
            /* Time spent working is not spinning: the spin starts over. */
            spin_end = now + spin_ns;
            yield_after = now + spin_ns / 8;
            if (mm_ring_peer_here(r, for_read)) sched_yield();
            continue;
        }
        if (here || (i & 63u) == 0) {
            uint64_t now = mm_now_ns();
            if (now >= spin_end) break;
            here = mm_ring_peer_here(r, for_read);
            if (here || now >= yield_after) sched_yield();
        }
        mm_cpu_relax();
    }
    int fd = for_read ? r->data_fd : r->space_fd;
    for (;;) {
        int64_t left_ms = -1;
        if (timeout_ns >= 0) {
            uint64_t now = mm_now_ns();
            if (now - start >= (uint64_t)timeout_ns) return MM_READY() ? MM_RING_OK : MM_RING_TIMEOUT;
            left_ms = (int64_t)(((uint64_t)timeout_ns - (now - start) + 999999u) / 1000000u);
        }
        if (!mm_ring_park(r, for_read, need)) return MM_RING_OK;
        struct pollfd fds[2] = {{fd, POLLIN, 0}, {peer_pidfd, POLLIN, 0}};
        int rc = poll(fds, peer_pidfd >= 0 ? 2 : 1, (int)(left_ms > 0x7fffffff ? 0x7fffffff : left_ms));
        int saved = errno;
        mm_ring_unpark(r, for_read); /* its read() may set errno (EAGAIN) */
        if (MM_READY()) return MM_RING_OK;
        if (rc < 0) {
            errno = saved; /* EINTR included: the caller runs signal handlers */
            return MM_RING_ERRNO;
        }
        if (rc > 0 && peer_pidfd >= 0 && (fds[1].revents & POLLIN)) return MM_RING_PEER_DIED;
    }
#undef MM_READY
}

#endif
