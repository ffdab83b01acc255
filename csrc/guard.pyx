"""Write guards on a CPU worker's read-only private mappings of host-tier
segments (csrc/guard.h): a write makes the mapping writable and is noted,
so that an eviction looks for written pages only where one came."""
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from posix.mman cimport PROT_READ, PROT_WRITE, mprotect

from guard cimport *

import os

PAGE = os.sysconf("SC_PAGE_SIZE")


def add(uintptr_t address, uintptr_t length):
    """Guards the read-only mapped range [address, address + length), which
    starts on a page (its end is rounded up to one): its index. None where
    it cannot be (the handler refused, or every guard is in use): then the
    range is made writable, unguarded, and any page of it may be written."""
    if address % PAGE:
        raise ValueError("a guarded range starts on a page")
    cdef uintptr_t end = address + (length + PAGE - 1) // PAGE * PAGE
    cdef int i = -1
    if mm_guard_install() == 0:
        i = mm_guard_add(address, end)
    if i >= 0:
        return i
    if mprotect(<void *>address, end - address, PROT_READ | PROT_WRITE):
        raise OSError(errno, os.strerror(errno))
    return None


def _index(int i):
    if not 0 <= i < MM_GUARDS:
        raise IndexError(i)
    return i


def written(int i):
    """Whether the range was written since it was guarded or rearmed."""
    return bool(mm_guard_written(_index(i)))


def rearm(int i):
    """Makes the range read-only again (once its written pages are given
    back): the next write is noted anew."""
    if mm_guard_rearm(_index(i)):
        raise OSError(errno, os.strerror(errno))


def remove(int i):
    """Stops guarding the range (before it is unmapped)."""
    mm_guard_remove(_index(i))
