# Write guards on private mappings of host-tier segments: see guard.h.
from libc.stdint cimport uintptr_t


cdef extern from "guard.h" nogil:
    int MM_GUARDS
    int mm_guard_install()
    int mm_guard_add(uintptr_t start, uintptr_t end)
    int mm_guard_written(int i)
    int mm_guard_rearm(int i)
    void mm_guard_remove(int i)
