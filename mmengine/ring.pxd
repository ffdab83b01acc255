# Declares the spinning waiters' back-off as extension types where ring.py
# is compiled (setup.py): the front-end asks its polls' back-off whether to
# spin at each inference it sends (workers.pxd types the field, so that it
# is a C call), and its listener's at each answer. The source runs
# unchanged where it is not compiled.

cdef class CpuTaken:
    cdef public object looked, at, runq, slices, source
    cpdef bint look(self, now=*)


cdef class BackOff:
    cdef public object spin_from, length, count, spun, spun_taken
    cpdef bint spins(self, now)
    cpdef bint spins_looking(self, now, CpuTaken cpu)
    cpdef bint preempted(self, now)
    cpdef back_off(self, now)
