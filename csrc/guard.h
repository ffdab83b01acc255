/* Write guards on a CPU worker's private mappings of host-tier segments
 * (mmengine/backends/safetensors.py, HOST_MAPS).
 *
 * Why: a model that writes its own tensors (a counter in a buffer) writes
 * copies of their pages, which must go back to the segment's before its
 * next load. Finding them meant reading /proc/self/pagemap over the whole
 * mapping at every eviction: the kernel walks the page table and each
 * page's struct page, ~2 ms per 256 MiB, and the small model beside it
 * served its slowest requests 2 times slower for it (benchmarks/RESULTS.md,
 * Loads, session 39), whichever thread read it. Almost no model writes.
 *
 * So a guarded mapping is read-only, and the first write to it faults:
 * this SIGSEGV handler makes the whole range writable, notes that it was
 * written, and returns, so that the write runs again (on a private copy of
 * its page). An eviction walks the page table only where a write came. A
 * fault outside every guard goes to the handler that was there before
 * (the default one: the process dies of it, as it would have), and so does
 * a SIGSEGV sent by kill() or raise(), which is no fault. Installed
 * once: a library that later puts in a handler of its own that does not
 * pass faults on would make a guarded write fatal (torch puts in none).
 *
 * A fixed table, filled and emptied by the loader thread while no model
 * runs on the range; the handler only reads it.
 */
#ifndef MMENGINE_GUARD_H
#define MMENGINE_GUARD_H

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define MM_GUARDS 4096

typedef struct {
    _Atomic uintptr_t start; /* 0: a free entry */
    uintptr_t end;
    _Atomic int written;
} mm_guard;

static mm_guard mm_guards[MM_GUARDS];
static struct sigaction mm_guard_previous;
static int mm_guard_installed;

static void mm_guard_on_fault(int sig, siginfo_t *info, void *context) {
    /* The kernel's (a fault) or sent (kill, raise: si_code <= 0, and what
     * stands where a fault has its address is the sender's pid and uid). */
    int fault = info->si_code > 0;
    uintptr_t at = (uintptr_t)info->si_addr;
    for (int i = 0; fault && i < MM_GUARDS; i++) {
        uintptr_t start = atomic_load_explicit(&mm_guards[i].start, memory_order_acquire);
        if (start == 0 || at < start || at >= mm_guards[i].end) continue;
        /* Two threads may both fault here: both make it writable. */
        if (mprotect((void *)start, mm_guards[i].end - start, PROT_READ | PROT_WRITE) != 0)
            break;
        atomic_store(&mm_guards[i].written, 1);
        return; /* the write runs again */
    }
    if (mm_guard_previous.sa_flags & SA_SIGINFO) {
        mm_guard_previous.sa_sigaction(sig, info, context);
    } else if (mm_guard_previous.sa_handler == SIG_IGN) {
        if (fault) /* ignored, it would come again for ever: it kills, as the kernel has it */
            signal(sig, SIG_DFL);
    } else if (mm_guard_previous.sa_handler == SIG_DFL) {
        signal(sig, SIG_DFL); /* a fault comes again, and kills as it would have; */
        if (!fault)           /* one sent comes once: its default action, at this return */
            raise(sig);
    } else {
        mm_guard_previous.sa_handler(sig);
    }
}

/* Installs the handler once; 0, or -1 with errno. The loader thread's. */
static inline int mm_guard_install(void) {
    if (mm_guard_installed) return 0;
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_sigaction = mm_guard_on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGSEGV, &action, &mm_guard_previous) != 0) return -1;
    mm_guard_installed = 1;
    return 0;
}

/* Guards [start, end) (page-aligned; already mapped read-only): its index,
 * or -1 where the table is full. */
static inline int mm_guard_add(uintptr_t start, uintptr_t end) {
    for (int i = 0; i < MM_GUARDS; i++) {
        if (atomic_load_explicit(&mm_guards[i].start, memory_order_relaxed)) continue;
        mm_guards[i].end = end;
        atomic_store(&mm_guards[i].written, 0);
        atomic_store_explicit(&mm_guards[i].start, start, memory_order_release);
        return i;
    }
    return -1;
}

static inline int mm_guard_written(int i) { return atomic_load(&mm_guards[i].written); }

/* Read-only again (its written pages given back first); 0, or -1 with errno. */
static inline int mm_guard_rearm(int i) {
    uintptr_t start = atomic_load(&mm_guards[i].start);
    if (mprotect((void *)start, mm_guards[i].end - start, PROT_READ) != 0) return -1;
    atomic_store(&mm_guards[i].written, 0);
    return 0;
}

static inline void mm_guard_remove(int i) {
    atomic_store_explicit(&mm_guards[i].start, 0, memory_order_release);
}

#endif
