# numpy's C API for the records' and the wire's fast paths: which arrays
# they take as they lie (plain_type), and the arrays their reads make
# (array_over): np.ndarray(shape, dtype, buffer) parses its arguments and
# asks for the buffer on the Python level, ~0.25 us an array, several
# arrays a round trip. A module that cimports this calls
# numpy.import_array() as it is imported.
cimport numpy as cnp
from cpython.ref cimport Py_INCREF


cdef extern from "numpy/arrayobject.h":
    # (numpy's Cython declarations leave it out: it takes `descr`'s reference.)
    object PyArray_NewFromDescr(type subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)


cdef enum:
    MAX_DIMS = 32  # more go numpy's Python way (numpy 1 took no more)


cdef inline object array_over(cnp.dtype dtype, int nd, cnp.npy_intp *dims, char *data,
                              object owner, bint writeable):
    """A C-contiguous array of `dtype` and shape dims[:nd] over `data`,
    memory that `owner` holds and keeps alive (its base); read-only unless
    `writeable`. With `data` NULL, over memory of its own (uninitialised;
    no base). ValueError where numpy takes no such size."""
    Py_INCREF(dtype)  # taken by PyArray_NewFromDescr, even where it fails
    cdef cnp.ndarray array
    if data == NULL:  # (its flags then mean Fortran order: 0, C's, writable)
        return PyArray_NewFromDescr(cnp.ndarray, dtype, nd, dims, NULL, NULL, 0, None)
    array = PyArray_NewFromDescr(
        cnp.ndarray, dtype, nd, dims, NULL, data,
        cnp.NPY_ARRAY_C_CONTIGUOUS | (cnp.NPY_ARRAY_WRITEABLE if writeable else 0), None)
    cnp.set_array_base(array, owner)
    return array


cdef inline int plain_type(object value):
    """The numpy type number of `value` where it is an array the fast paths
    take as it lies (an exact ndarray, C-contiguous, in native order), each
    then asking its own table whether they carry that type; -1 for anything
    else. Read off the array, not off a buffer's format string, which numpy
    builds per export."""
    if type(value) is not cnp.ndarray:
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>value
    if not (cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISNOTSWAPPED(a)):
        return -1
    return cnp.PyArray_TYPE(a)
