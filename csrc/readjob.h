/* A load's read that a CPU worker's serving thread helps with while it
 * waits for requests (mmengine/staging.py, Readers; csrc/reads.pyx).
 *
 * Why: on a machine whose cores are all busy serving, a load's reader
 * thread can only run by taking a core from a request (the kernel lets a
 * thread that does not sleep keep its core to the next tick, milliseconds
 * later), and the serving thread, when it has no request, only spins. So
 * the serving thread reads the load's next small part itself between its
 * looks at the request ring: the load moves in the gaps between requests,
 * and a request that comes waits for one part's copy at most, on a core
 * that never changed hands.
 *
 * One slot per worker, never freed. The reader thread owns it: it fills in
 * a read, sets `active`, claims parts itself as well, clears `active`, and
 * then waits until no helper is inside a step (a helper's claimed part is
 * read within its step) before the memory or the descriptor may go. A
 * helper counts itself in `stepping` before it looks at `active` (both
 * seq_cst), so the owner's two steps never miss a helper that saw the read.
 */
#ifndef MMENGINE_READJOB_H
#define MMENGINE_READJOB_H

#include <errno.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    _Atomic int owned;         /* a read has the slot (mm_readjob_take) */
    _Atomic int active;        /* a read is under way: its fields are set */
    _Atomic int stepping;      /* helpers inside mm_readjob_step */
    int fd;
    uint8_t *out;
    int64_t n;                 /* bytes to read into out */
    int64_t offset;            /* of out[0] in the file */
    int64_t part;              /* a helper's claim, in bytes */
    _Atomic int64_t next;      /* the first byte nobody has claimed */
    _Atomic int error;         /* the first failure: an errno, or -1: the file ended */
    _Atomic int64_t helped_at; /* CLOCK_MONOTONIC ns of a helper's last claim */
    _Atomic int64_t helped;    /* bytes helpers have claimed, over all reads */
} mm_readjob;

static inline int64_t mm_readjob_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Reads the claim [at, at + want) of the job's range; a failure is the
 * job's error. */
static inline void mm_readjob_fill(mm_readjob *j, int64_t at, int64_t want) {
    int64_t done = 0;
    while (done < want) {
        ssize_t got = pread(j->fd, j->out + at + done, (size_t)(want - done),
                            (off_t)(j->offset + at + done));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            int expected = 0;
            atomic_compare_exchange_strong(&j->error, &expected, got < 0 ? errno : -1);
            break;
        }
        done += got;
    }
}

/* Claims `want` bytes of the job: their start, or -1 when all is claimed
 * or a part has failed (nothing more is worth reading). */
static inline int64_t mm_readjob_claim(mm_readjob *j, int64_t want, int64_t *got) {
    if (atomic_load_explicit(&j->error, memory_order_relaxed)) return -1;
    int64_t at = atomic_fetch_add(&j->next, want);
    if (at >= j->n) return -1;
    *got = j->n - at < want ? j->n - at : want;
    return at;
}

/* A waiting serving thread's step (the ring's idle work): reads one part
 * of the job if a read is under way; 1 if it did, 0 if there was none. */
static inline int mm_readjob_step(void *arg) {
    mm_readjob *j = (mm_readjob *)arg;
    /* The common case, no load: a plain load, no write to the slot's line. */
    if (!atomic_load_explicit(&j->active, memory_order_relaxed)) return 0;
    int did = 0, saved = errno;
    atomic_fetch_add(&j->stepping, 1);
    /* Nothing left to claim: no claim, so `next` stops growing. */
    if (atomic_load(&j->active) && atomic_load_explicit(&j->next, memory_order_relaxed) < j->n) {
        int64_t want = 0, at = mm_readjob_claim(j, j->part, &want);
        if (at >= 0) {
            atomic_store_explicit(&j->helped_at, mm_readjob_now(), memory_order_relaxed);
            atomic_fetch_add_explicit(&j->helped, want, memory_order_relaxed);
            mm_readjob_fill(j, at, want);
            did = 1;
        }
    }
    atomic_fetch_sub(&j->stepping, 1);
    errno = saved;
    return did;
}

/* Whether the calling read may use the slot (one read at a time does);
 * mm_readjob_give hands it back after mm_readjob_close. */
static inline int mm_readjob_take(mm_readjob *j) {
    int expected = 0;
    return atomic_compare_exchange_strong(&j->owned, &expected, 1);
}

static inline void mm_readjob_give(mm_readjob *j) { atomic_store(&j->owned, 0); }

/* The owner's: a read is under way from now on (its fields are set). */
static inline void mm_readjob_open(mm_readjob *j) {
    atomic_store(&j->next, 0);
    atomic_store(&j->error, 0);
    atomic_store(&j->helped_at, 0);
    atomic_store(&j->active, 1);
}

/* The owner's, once it claims nothing more: waits out every helper inside a
 * step, and so every part a helper claimed; after it the memory and the
 * descriptor may go. */
static inline void mm_readjob_close(mm_readjob *j) {
    atomic_store(&j->active, 0);
    while (atomic_load(&j->stepping)) sched_yield();
}

static inline int64_t mm_readjob_helped_at(mm_readjob *j) {
    return atomic_load_explicit(&j->helped_at, memory_order_relaxed);
}

static inline int mm_readjob_error(mm_readjob *j) { return atomic_load(&j->error); }

static inline int64_t mm_readjob_helped(mm_readjob *j) {
    return atomic_load_explicit(&j->helped, memory_order_relaxed);
}

#endif
