# The native ring, as Cython sees it. ring.h holds the code; this file is the
# list of everything that crosses from Cython into C, and the layout that
# mmengine/ring.py's docstring specifies.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t


cdef extern from "ring.h" nogil:
    enum:
        MM_RING_HEADER_BYTES
        MM_RING_MAX_PARTS
        MM_RING_CREATOR_CLOSED
        MM_RING_ATTACHER_CLOSED

    enum mm_ring_status:
        MM_RING_OK
        MM_RING_AGAIN        # full (put) or empty (get)
        MM_RING_TOO_BIG      # the record can never fit; nothing written
        MM_RING_CLOSED       # the peer closed its end
        MM_RING_TIMEOUT
        MM_RING_PEER_DIED    # the peer's pidfd reported its exit
        MM_RING_ERRNO        # a system call failed; errno says which
        MM_RING_CORRUPT      # the peer wrote what is no record

    ctypedef struct mm_ring_header:
        uint64_t magic
        uint32_t version
        uint32_t closed            # _Atomic: MM_RING_*_CLOSED bits
        uint64_t capacity          # bytes of the data area, a power of two
        int32_t creator_pid        # _Atomic
        int32_t attacher_pid       # _Atomic
        uint64_t tail              # _Atomic, own cache line: bytes published
        uint64_t head              # _Atomic, own cache line: bytes released
        uint64_t taken             # _Atomic, the consumer's line: records got
        uint32_t consumer_parked   # _Atomic, own cache line
        uint32_t consumer_backoffs # _Atomic, the consumer's line
        uint32_t producer_parked   # _Atomic, own cache line
        uint32_t producer_backoffs # _Atomic, the producer's line

    ctypedef struct mm_ring:
        mm_ring_header *hdr
        uint8_t *data
        uint64_t cap
        uint64_t mask
        int data_fd
        int space_fd
        uint32_t peer_closed_bit
        uint64_t held
        uint64_t spin_ns
        uint32_t rec_nparts        # the last record got, as checked
        uint32_t rec_lens[MM_RING_MAX_PARTS]
        int (*idle_step)(void *) noexcept nogil
        void *idle_arg

    uint64_t mm_align8(uint64_t n)
    uint64_t mm_ring_spin(const mm_ring *r)
    void mm_ring_set_spin(mm_ring *r, uint64_t spin_ns)
    uint32_t mm_ring_backoffs(const mm_ring *r, int for_read)
    uint64_t mm_ring_taken(const mm_ring *r)
    void mm_ring_unbind(mm_ring *r)
    void mm_ring_close_end(mm_ring *r)
    uint64_t mm_now_ns()
    enum:
        MM_RING_PREEMPTED_NS
        MM_RING_TAKEN_SHARE
        MM_RING_TURN_NS
        MM_RING_CONTENDED_WITHIN
        MM_RING_BACKOFF_NS
        MM_RING_MAX_BACKOFF_NS
    uint64_t mm_ring_record_size(uint32_t nparts, const uint64_t *lens)
    void mm_ring_bind(mm_ring *r, void *base, int data_fd, int space_fd,
                      int is_creator, uint64_t spin_ns)
    int mm_ring_try_put(mm_ring *r, uint32_t nparts, const uint8_t *const *parts,
                        const uint64_t *lens, int hold)
    void mm_ring_publish(mm_ring *r)
    int mm_ring_try_get(mm_ring *r, const uint8_t **rec)
    void mm_ring_release(mm_ring *r)
    void mm_cpu_relax()
    int mm_ring_readable(const mm_ring *r)
    int mm_ring_writable(const mm_ring *r, uint64_t need)
    int mm_ring_park(mm_ring *r, int for_read, uint64_t need)
    void mm_ring_unpark(mm_ring *r, int for_read)
    int mm_ring_wait(mm_ring *r, int for_read, uint64_t need, int64_t timeout_ns,
                     int peer_pidfd)


cdef extern from "readjob.h" nogil:
    int mm_readjob_step(void *arg) noexcept
