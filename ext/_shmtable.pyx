# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: autotestdict=False, embedsignature=False, initializedcheck=False, auto_pickle=False
"""Shared-memory Table and Atomic: the data structures, in C types, with no policy.

Segment naming, creation, permissions and cleanup live in ``zeal_asgi.shm.segments``; this module
only maps a file descriptor it is given and runs the table on it (see ``zt_core.h`` for the
layout and the locking rules).  Python objects are converted before any lock is taken and built
after every lock is released.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_New, PyDict_SetItem
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_Check, PyFloat_FromDouble
from cpython.long cimport PyLong_Check, PyLong_FromLongLong
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.math cimport isfinite
from libc.stdint cimport INT64_MAX, INT64_MIN, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from posix.unistd cimport close as c_close

import os

from zeal_asgi import errors as _errors

cdef extern from "sys/mman.h":
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "errno.h":
    int errno
cdef inline int _errno() noexcept:
    return errno

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    bint PyBool_Check(object o)
    bint PyByteArray_Check(object o)

cdef extern from "zt_core.h" nogil:
    int ZT_OK, ZT_ETIMEDOUT, ZT_EFULL, ZT_EOVERFLOW, ZT_ELOCK, ZT_ENONFINITE, ZT_EBUSYREAD
    int ZT_INT, ZT_FLOAT, ZT_STRING, ZT_BYTES
    int ZT_MAX_COLUMNS
    uint64_t ZT_MAGIC_TABLE
    unsigned ZT_SCHEMA_MAX

    ctypedef struct zt_header:
        uint64_t magic
        uint64_t total_size
        uint64_t nonce[2]
        uint32_t capacity
        uint32_t row_size
        uint32_t key_limit
        uint32_t n_stripes
        uint32_t schema_len
        uint64_t index_slots
        uint64_t created_ns
        char schema[1]
        int64_t row_count
        uint32_t next_unused
        int64_t dead_rows
        int64_t lock_recoveries
        int64_t rows_lost
        int64_t lock_timeouts
        int64_t read_fallbacks
        int64_t inserts
        int64_t deletes

    ctypedef struct zt_table:
        char *base
        size_t size
        zt_header *hdr
        uint32_t row_size
        uint32_t capacity
        uint32_t key_limit
        uint32_t key_off
        int64_t lock_timeout_ns
        int64_t local_recoveries

    ctypedef struct zt_col:
        uint8_t type
        uint8_t width
        uint32_t offset
        uint32_t size

    ctypedef struct zt_delta:
        int col
        int64_t i
        double f
        const char *s
        uint32_t slen

    ctypedef struct zt_geometry:
        uint32_t capacity, row_size, key_limit, key_off, n_stripes
        uint64_t index_slots, off_global, off_stripes, off_index, off_rows, total_size

    ctypedef struct zt_atomic_seg:
        int64_t value
        uint64_t nonce[2]

    int zt_init(zt_table *t, char *base, const zt_geometry *g, const uint64_t *nonce,
                const uint64_t *hkey, const char *schema, uint32_t schema_len)
    int zt_check(const char *base, size_t size, uint64_t magic)
    void zt_bind(zt_table *t, char *base, size_t size)
    int zt_get(zt_table *t, const char *key, uint16_t klen, char *copy)
    int zt_set(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
               const zt_delta *d, int nd)
    int zt_incr_int(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, int ci,
                    int64_t by, int64_t *out)
    int zt_incr_float(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, int ci,
                      double by, int allow_nonfinite, double *out)
    int zt_cas(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
               const zt_delta *expected, const zt_delta *desired, int *swapped)
    int zt_delete(zt_table *t, const char *key, uint16_t klen)
    int zt_clear(zt_table *t)
    int zt_read_at(zt_table *t, uint32_t r, char *copy)
    int zt_read_at_locked(zt_table *t, uint32_t r, char *copy)
    int64_t zt_get_int(const char *row, const zt_col *c)
    double zt_get_float(const char *row, const zt_col *c)
    uint32_t zt_get_slen(const char *row, const zt_col *c)
    const char *zt_get_sptr(const char *row, const zt_col *c)
    uint16_t zt_keylen(const char *row)
    int zt_robust_supported()
    void zt_abi_tag(char *out)

    void zt_atomic_init(zt_atomic_seg *a, size_t size, const uint64_t *nonce, int64_t v)
    int zt_atomic_check(const zt_atomic_seg *a, size_t size)
    int64_t zt_a_load(int64_t *p)
    void zt_a_store(int64_t *p, int64_t v)
    int zt_a_add(int64_t *p, int64_t d, int64_t *out)
    int zt_a_cas(int64_t *p, int64_t expect, int64_t desired)

    int zt_crash_id
    long zt_crash_countdown
    int zt_crash_sig

cdef extern from *:
    """
    static inline uint32_t zt_next_unused(zt_table *t) {
        return __atomic_load_n(&t->hdr->next_unused, __ATOMIC_ACQUIRE);
    }
    static inline int64_t zt_load64(int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    """
    uint32_t zt_next_unused(zt_table *t) nogil
    int64_t zt_load64(int64_t *p) nogil

cdef enum:
    STACK_ROW_WORDS = 256   # rows up to 2 KiB are copied on the stack

cdef object ValueTooLargeError = _errors.ValueTooLargeError
cdef object UnknownColumnError = _errors.UnknownColumnError
cdef object ColumnTypeError = _errors.ColumnTypeError
cdef object IntegerOverflowError = _errors.IntegerOverflowError
cdef object NonFiniteFloatError = _errors.NonFiniteFloatError
cdef object InvalidKeyError = _errors.InvalidKeyError
cdef object KeyTooLongError = _errors.KeyTooLongError
cdef object KeyTypeError = _errors.KeyTypeError
cdef object TableFullError = _errors.TableFullError
cdef object LockTimeoutError = _errors.LockTimeoutError
cdef object ShmError = _errors.ShmError
cdef object ShmAbiMismatchError = _errors.ShmAbiMismatchError

cdef int64_t INT_MIN[9]
cdef int64_t INT_MAX[9]
INT_MIN[1] = -128; INT_MAX[1] = 127
INT_MIN[2] = -32768; INT_MAX[2] = 32767
INT_MIN[4] = -2147483648; INT_MAX[4] = 2147483647
INT_MIN[8] = INT64_MIN; INT_MAX[8] = INT64_MAX

_TYPE_NAME = {1: "INT", 2: "FLOAT", 3: "STRING", 4: "BYTES"}


def robust_mutexes_supported():
    """True when this libc builds robust, process-shared mutexes (read back from the attrs)."""
    return bool(zt_robust_supported())


def abi_tag():
    """The ABI tag written into every segment header; attach refuses a different one."""
    cdef char buf[64]
    zt_abi_tag(buf)
    return buf.decode()


def _set_crashpoint(int point, long nth, int sig):
    """Arm a deterministic crash point (fault tests only): raise `sig` on the nth hit."""
    global zt_crash_id, zt_crash_countdown, zt_crash_sig
    zt_crash_countdown = nth
    zt_crash_sig = sig
    zt_crash_id = point


cdef inline void _raise_rc(int rc, str what) except *:
    if rc == ZT_ETIMEDOUT:
        raise LockTimeoutError(
            f"{what}: row lock not obtained within the lock timeout; another process holds it "
            "and is not progressing (stopped or stuck); it was not force-unlocked")
    if rc == ZT_EFULL:
        raise TableFullError(what)
    raise ShmError(f"{what}: lock error (code {rc})")


cdef class _Mapping:
    """An mmap of a segment fd, owned by one Table or Atomic."""
    cdef char *base
    cdef size_t size
    cdef int fd

    def __cinit__(self):
        self.base = NULL
        self.size = 0
        self.fd = -1

    cdef int map(self, int fd, size_t size) except -1:
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(os.strerror(_errno()), "mmap")
        self.base = <char *>p
        self.size = size
        self.fd = fd
        return 0

    cdef void unmap(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    cdef void detach(self):
        """Unmap but leave the fd to the caller (a failed attach: the caller still owns it)."""
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        self.fd = -1

    def __dealloc__(self):
        self.unmap()


cdef class Table:
    """A fixed-schema hash table in shared memory, shared by every worker of one server.

    Build tables with ``Store.make(name, max_rows, columns)`` (or ``Table(max_rows, columns,
    name=...)``) before workers start.  Every method is synchronous and takes nanoseconds to
    microseconds; one ``set`` is atomic (readers see the old or the new row), ``incr``/``decr``/
    ``compare_and_set`` are atomic across processes, and no input is ever truncated or wrapped.

    Example::

        t = Store.make("users", 1024, {"name": (Store.TYPE_STRING, 32), "score": (Store.TYPE_INT, 4)})
        t.set("u1", {"name": "alice", "score": 100})
        t.incr("u1", "score")          # 101
        t.get("u1")                    # {'name': 'alice', 'score': 101}
    """

    cdef zt_table t
    cdef _Mapping _map
    cdef zt_col cols[64]
    cdef int ncols
    cdef dict _colidx
    cdef tuple _names
    cdef tuple _types
    cdef bint _allow_nan
    cdef bint _binary_keys
    cdef bint _has_strings
    cdef int64_t _seen_recoveries
    cdef readonly object name
    cdef readonly object path
    cdef readonly object schema
    cdef readonly bint created
    cdef object __weakref__
    cdef public object _owner

    def __cinit__(self, *args, **kwargs):
        self._map = _Mapping()
        self.ncols = 0
        self._colidx = {}
        self._names = ()
        self._types = ()
        self.t.base = NULL
        self.t.lock_timeout_ns = 1000000000
        self.name = None
        self.path = None
        self.schema = None
        self.created = False
        self._owner = None

    def __init__(self, max_rows, columns, *, name=None, key_size=64, lock_timeout=1.0,
                 allow_nan=False, binary_keys=False):
        from zeal_asgi.shm import segments as _segments
        _segments.open_table(self, name, max_rows, columns, key_size=key_size,
                             lock_timeout=lock_timeout, allow_nan=allow_nan,
                             binary_keys=binary_keys)

    # -- set-up, driven by zeal_asgi.shm.segments ------------------------------------------------

    def _map_new(self, int fd, tuple geometry, bytes schema_blob, bytes nonce, bytes hkey):
        cdef zt_geometry g
        cdef uint64_t n[2]
        cdef uint64_t k[2]
        (g.capacity, g.row_size, g.key_limit, g.key_off, g.n_stripes, g.index_slots,
         g.off_global, g.off_stripes, g.off_index, g.off_rows, g.total_size) = geometry
        if len(nonce) != 16 or len(hkey) != 16:
            raise ValueError("nonce and hash key are 16 bytes")
        memcpy(n, PyBytes_AS_STRING(nonce), 16)
        memcpy(k, PyBytes_AS_STRING(hkey), 16)
        self._map.map(fd, g.total_size)
        cdef int rc = zt_init(&self.t, self._map.base, &g, n, k, PyBytes_AS_STRING(schema_blob),
                              <uint32_t>PyBytes_GET_SIZE(schema_blob))
        if rc != 0:
            self._map.detach()
            raise OSError(rc, "initialising the table's mutexes: " + os.strerror(rc))
        self.created = True

    def _map_existing(self, int fd, size_t size):
        """Map and validate a segment made by another process.

        Returns 0 when valid, 1 when its creator has not finished (or died) initialising it;
        raises ShmAbiMismatchError when it was made by an incompatible build.
        """
        self._map.map(fd, size)
        cdef int rc = zt_check(self._map.base, size, ZT_MAGIC_TABLE)
        if rc == 1:
            self._map.detach()
            return 1
        if rc != 0:
            self._map.detach()
            reason = {2: "made by an incompatible build (ABI or layout differs)",
                      3: "its header checksum is wrong (corrupt or foreign)",
                      4: "its size does not match its header"}[rc]
            raise ShmAbiMismatchError(f"shared-memory segment is unusable: {reason}")
        zt_bind(&self.t, self._map.base, size)
        return 0

    def _fileno(self):
        """The segment's file descriptor (kept open: its flock marks this process as a user)."""
        return self._map.fd

    def _detach(self):
        """Unmap a segment we attached to but will not use; the caller keeps the fd."""
        self._map.detach()
        self.t.base = NULL

    def _stored_schema(self):
        cdef zt_header *h = <zt_header *>self._map.base
        return PyBytes_FromStringAndSize(h.schema, h.schema_len)

    def _finish(self, schema, name, path, double lock_timeout):
        """Bind the process-local column descriptors (after the schema was checked)."""
        cdef int i = 0
        self.schema = schema
        self.name = name
        self.path = path
        self.lock_timeout = lock_timeout
        names = []
        types = []
        self._colidx = {}
        self._has_strings = False
        for c in schema.columns:
            self.cols[i].type = int(c.type)
            self.cols[i].width = c.width
            self.cols[i].offset = c.offset
            self.cols[i].size = c.size
            if c.type in (ZT_STRING, ZT_BYTES):
                self._has_strings = True
            key = c.name
            self._colidx[key] = i
            names.append(key)
            types.append(int(c.type))
            i += 1
        self.ncols = i
        self._names = tuple(names)
        self._types = tuple(types)
        self._allow_nan = schema.allow_nan
        self._binary_keys = schema.binary_keys
        self._seen_recoveries = 0

    # -- properties ---------------------------------------------------------------------------

    @property
    def capacity(self):
        """Rows that fit: exactly the ``max_rows`` the table was made with."""
        self._check_open()
        return self.t.capacity

    @property
    def memory_bytes(self):
        """Bytes of shared memory reserved for the table (header, locks, index and rows)."""
        self._check_open()
        return self.t.size

    @property
    def nonce(self):
        """Random identity of the segment: equal in every process that shares the table."""
        self._check_open()
        cdef zt_header *h = self.t.hdr
        return PyBytes_FromStringAndSize(<char *>h.nonce, 16).hex()

    @property
    def columns(self):
        """Column names in declaration order."""
        return self._names

    @property
    def closed(self):
        """True once ``close()`` unmapped the table in this process."""
        return self._map.base == NULL

    @property
    def lock_timeout(self):
        """Seconds a write waits for a row lock held by another process (this process only)."""
        return self.t.lock_timeout_ns / 1e9

    @lock_timeout.setter
    def lock_timeout(self, double value):
        if not (value > 0 and value <= 3600):
            raise ValueError(f"lock_timeout must be in (0, 3600] seconds, got {value}")
        self.t.lock_timeout_ns = <int64_t>(value * 1e9)

    def __len__(self):
        self._check_open()
        return zt_load64(&self.t.hdr.row_count)

    def count(self):
        """Number of rows (O(1), shared by every process)."""
        self._check_open()
        return zt_load64(&self.t.hdr.row_count)

    def stats(self):
        """Counters of the shared table (rows, capacity, memory, lock recoveries, ...)."""
        self._check_open()
        cdef zt_header *h = self.t.hdr
        return {
            "rows": zt_load64(&h.row_count),
            "capacity": self.t.capacity,
            "memory_bytes": self.t.size,
            "row_size": self.t.row_size,
            "key_limit": self.t.key_limit,
            "index_slots": h.index_slots,
            "stripes": h.n_stripes,
            "lock_recoveries": zt_load64(&h.lock_recoveries),
            "rows_lost": zt_load64(&h.rows_lost),
            "dead_rows": zt_load64(&h.dead_rows),
            "lock_timeouts": zt_load64(&h.lock_timeouts),
            "read_fallbacks": zt_load64(&h.read_fallbacks),
            "inserts": zt_load64(&h.inserts),
            "deletes": zt_load64(&h.deletes),
        }

    def close(self):
        """Unmap the table in this process (other processes keep it).  Idempotent."""
        self._map.unmap()
        self.t.base = NULL

    def __repr__(self):
        if self._map.base == NULL:
            return f"<Table {self.name!r} closed>"
        return (f"<Table {self.name!r} rows={zt_load64(&self.t.hdr.row_count)} "
                f"capacity={self.t.capacity}>")

    def __reduce__(self):
        raise TypeError(
            "a Table is bound to its shared-memory mapping and cannot be pickled; "
            "declare it with Store.make() in the app module so every worker attaches by name")

    # -- internals ----------------------------------------------------------------------------

    cdef inline int _check_open(self) except -1:
        if self._map.base == NULL:
            raise ShmError(f"table {self.name!r} is closed in this process")
        return 0

    cdef inline int _key(self, object key, const char **p, Py_ssize_t *n) except -1:
        if self._map.base == NULL:
            self._check_open()
        if PyUnicode_Check(key):
            try:
                p[0] = PyUnicode_AsUTF8AndSize(key, n)
            except UnicodeEncodeError as exc:
                raise InvalidKeyError(
                    f"key {key!r} of table {self.name!r} is not encodable as UTF-8") from exc
        elif PyBytes_Check(key):
            p[0] = PyBytes_AS_STRING(key)
            n[0] = PyBytes_GET_SIZE(key)
            if not self._binary_keys:
                try:
                    (<bytes>key).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise InvalidKeyError(
                        f"key {key!r} of table {self.name!r} is not valid UTF-8; make the "
                        "table with binary_keys=True to store arbitrary bytes") from exc
        else:
            raise KeyTypeError(
                f"keys of table {self.name!r} are str or bytes, got {type(key).__name__}")
        if n[0] == 0:
            raise InvalidKeyError(f"empty key for table {self.name!r}")
        if n[0] > self.t.key_limit:
            raise KeyTooLongError(
                f"key of {n[0]} bytes exceeds the key limit of {self.t.key_limit} bytes of "
                f"table {self.name!r} (never truncated; raise key_size at make)")
        return 0

    cdef inline int _col(self, object column) except -1:
        cdef PyObject *o = PyDict_GetItem(self._colidx, column)
        if o == NULL:
            raise UnknownColumnError(
                f"table {self.name!r} has no column {column!r}; columns: {list(self._names)}")
        return <int><object>o

    cdef int _prepare(self, int ci, object value, zt_delta *d) except -1:
        """Validate `value` for column ci and fill d; raises naming the column and the limit."""
        cdef zt_col *c = &self.cols[ci]
        cdef int overflow = 0
        cdef long long iv
        cdef double fv
        cdef Py_ssize_t n
        cdef const char *s
        d.col = ci
        if c.type == ZT_INT:
            if PyLong_Check(value) and not PyBool_Check(value):
                iv = PyLong_AsLongLongAndOverflow(value, &overflow)
                if overflow or iv < INT_MIN[c.width] or iv > INT_MAX[c.width]:
                    raise IntegerOverflowError(
                        f"column {self._names[ci]!r} of table {self.name!r} is INT({c.width}): "
                        f"{value} is outside [{INT_MIN[c.width]}, {INT_MAX[c.width]}]")
                d.i = iv
                return 0
            raise ColumnTypeError(
                f"column {self._names[ci]!r} of table {self.name!r} is INT({c.width}); got "
                f"{type(value).__name__} {value!r} (no implicit conversion)")
        if c.type == ZT_FLOAT:
            if PyFloat_Check(value):
                fv = PyFloat_AS_DOUBLE(value)
            elif PyLong_Check(value) and not PyBool_Check(value):
                try:
                    fv = <double>value
                except OverflowError:
                    fv = 0.5  # not equal to any int: reported below
                if <object>fv != value:
                    raise ColumnTypeError(
                        f"column {self._names[ci]!r} of table {self.name!r} is FLOAT; the int "
                        f"{value} is not exactly representable as a double")
            else:
                raise ColumnTypeError(
                    f"column {self._names[ci]!r} of table {self.name!r} is FLOAT; got "
                    f"{type(value).__name__} {value!r}")
            if not self._allow_nan and not isfinite(fv):
                raise NonFiniteFloatError(
                    f"column {self._names[ci]!r} of table {self.name!r}: {value!r} is not finite "
                    "(make the table with allow_nan=True to store NaN/inf)")
            d.f = fv
            return 0
        if c.type == ZT_STRING:
            if not PyUnicode_Check(value):
                raise ColumnTypeError(
                    f"column {self._names[ci]!r} of table {self.name!r} is STRING({c.size}); "
                    f"got {type(value).__name__} (use a BYTES column for binary data)")
            try:
                s = PyUnicode_AsUTF8AndSize(value, &n)
            except UnicodeEncodeError as exc:
                raise ColumnTypeError(
                    f"column {self._names[ci]!r} of table {self.name!r}: the string is not "
                    "encodable as UTF-8") from exc
        else:
            if PyBytes_Check(value):
                s = PyBytes_AS_STRING(value)
                n = PyBytes_GET_SIZE(value)
            else:
                raise ColumnTypeError(
                    f"column {self._names[ci]!r} of table {self.name!r} is BYTES({c.size}); got "
                    f"{type(value).__name__}")
        if n > c.size:
            raise ValueTooLargeError(
                f"column {self._names[ci]!r} of table {self.name!r} holds {c.size} bytes; the "
                f"value is {n} bytes (never truncated)")
        d.s = s
        d.slen = <uint32_t>n
        return 0

    cdef object _value(self, const char *row, int ci):
        cdef zt_col *c = &self.cols[ci]
        if c.type == ZT_INT:
            return PyLong_FromLongLong(zt_get_int(row, c))
        if c.type == ZT_FLOAT:
            return PyFloat_FromDouble(zt_get_float(row, c))
        if c.type == ZT_STRING:
            return PyUnicode_DecodeUTF8(zt_get_sptr(row, c), zt_get_slen(row, c), "strict")
        return PyBytes_FromStringAndSize(zt_get_sptr(row, c), zt_get_slen(row, c))

    cdef object _row_dict(self, const char *row):
        cdef dict d = PyDict_New()
        cdef int i
        for i in range(self.ncols):
            PyDict_SetItem(d, self._names[i], self._value(row, i))
        return d

    cdef object _key_obj(self, const char *row):
        cdef uint16_t n = zt_keylen(row)
        if self._binary_keys:
            return PyBytes_FromStringAndSize(row + self.t.key_off, n)
        return PyUnicode_DecodeUTF8(row + self.t.key_off, n, "strict")

    cdef inline void _note_recoveries(self):
        if self.t.local_recoveries != self._seen_recoveries:
            self._seen_recoveries = self.t.local_recoveries
            from zeal_asgi.shm import segments as _segments
            _segments.report_recovery(self)

    # -- the API ------------------------------------------------------------------------------

    def get(self, key, field=None):
        """The row as a dict (declaration order), or one field's value; ``None`` when missing.

        Raises:
            UnknownColumnError: ``field`` is not a column.
        """
        cdef const char *k
        cdef Py_ssize_t kn
        cdef uint64_t stackbuf[STACK_ROW_WORDS]
        cdef char *buf = <char *>stackbuf
        cdef int ci = -1
        cdef int rc
        self._key(key, &k, &kn)
        if field is not None:
            ci = self._col(field)
        if self.t.row_size > STACK_ROW_WORDS * 8:
            buf = <char *>malloc(self.t.row_size)
            if buf == NULL:
                raise MemoryError()
        try:
            rc = zt_get(&self.t, k, <uint16_t>kn, buf)
            if rc < 0:
                _raise_rc(rc, f"get {key!r} from table {self.name!r}")
            if self.t.local_recoveries != self._seen_recoveries:
                self._note_recoveries()
            if rc == 0:
                return None
            if ci >= 0:
                return self._value(buf, ci)
            return self._row_dict(buf)
        finally:
            if buf != <char *>stackbuf:
                free(buf)

    def exists(self, key):
        """True when the key has a row."""
        return self._exists(key)

    cdef bint _exists(self, key) except -1:
        cdef const char *k
        cdef Py_ssize_t kn
        cdef uint64_t stackbuf[STACK_ROW_WORDS]
        self._key(key, &k, &kn)
        rc = zt_get(&self.t, k, <uint16_t>kn, <char *>stackbuf)
        if rc < 0:
            _raise_rc(rc, f"exists {key!r} in table {self.name!r}")
        return rc == 1

    def __contains__(self, key):
        return self.exists(key)

    def set(self, key, row):
        """Write a row: on an existing row only the given columns change; a new row starts zeroed.

        The whole row is validated before anything is written, and the write is atomic.
        Returns ``True``.

        Raises:
            UnknownColumnError, ColumnTypeError, IntegerOverflowError, ValueTooLargeError,
            NonFiniteFloatError: the value does not fit its column (the row is left unchanged).
            TableFullError: a new key and ``capacity`` rows already exist.
        """
        cdef const char *k
        cdef Py_ssize_t kn
        cdef zt_delta deltas[64]
        cdef PyObject *held[64]
        cdef int nd = 0, nheld = 0, i, ci, rc = 0
        cdef dict r
        self._key(key, &k, &kn)
        if type(row) is dict:
            r = <dict>row
        else:
            try:
                r = dict(row)
            except (TypeError, ValueError):
                raise ColumnTypeError(
                    f"a row of table {self.name!r} is a mapping of column -> value, got "
                    f"{type(row).__name__}") from None
        try:
            for col, value in r.items():
                ci = self._col(col)
                self._prepare(ci, value, &deltas[nd])
                nd += 1
                if self.cols[ci].type >= ZT_STRING:
                    # Another thread may mutate `row` while the GIL is released in a contended
                    # lock wait: keep the string objects alive ourselves.
                    Py_INCREF(value)
                    held[nheld] = <PyObject *>value
                    nheld += 1
            rc = zt_set(&self.t, k, <uint16_t>kn, self.cols, deltas, nd)
        finally:
            for i in range(nheld):
                Py_DECREF(<object>held[i])
        if rc != 0:
            if rc == ZT_EFULL:
                raise TableFullError(
                    f"table {self.name!r} is full: {self.t.capacity} rows (max_rows); delete "
                    "rows or make it larger")
            _raise_rc(rc, f"set {key!r} in table {self.name!r}")
        if self.t.local_recoveries != self._seen_recoveries:
            self._note_recoveries()
        return True

    def incr(self, key, column, by=1):
        """Atomically add ``by`` to a numeric column and return the new value.

        A missing row is created (zeroed) first.  INT columns take an int ``by`` and raise
        IntegerOverflowError past the column's range, leaving the value unchanged; FLOAT
        columns take an int or float and refuse a non-finite result.
        """
        cdef const char *k
        cdef Py_ssize_t kn
        cdef int ci, rc, overflow = 0
        cdef long long iby
        cdef int64_t iout = 0
        cdef double fby, fout = 0.0
        self._key(key, &k, &kn)
        ci = self._col(column)
        cdef zt_col *c = &self.cols[ci]
        if c.type == ZT_INT:
            if not PyLong_Check(by) or PyBool_Check(by):
                raise ColumnTypeError(
                    f"incr on INT column {column!r} of table {self.name!r} takes an int, got "
                    f"{type(by).__name__}")
            iby = PyLong_AsLongLongAndOverflow(by, &overflow)
            if overflow:
                raise IntegerOverflowError(
                    f"incr of column {column!r} of table {self.name!r} by {by}: the step is "
                    "outside the signed 64-bit range")
            rc = zt_incr_int(&self.t, k, <uint16_t>kn, self.cols, ci, iby, &iout)
            if rc == ZT_EOVERFLOW:
                raise IntegerOverflowError(
                    f"incr of column {column!r} of table {self.name!r} by {by} would leave "
                    f"[{INT_MIN[c.width]}, {INT_MAX[c.width]}] (INT({c.width})); the value stays "
                    f"{iout}")
            if rc != 0:
                _raise_rc(rc, f"incr {key!r} in table {self.name!r}")
            if self.t.local_recoveries != self._seen_recoveries:
                self._note_recoveries()
            return iout
        if c.type == ZT_FLOAT:
            if PyFloat_Check(by):
                fby = PyFloat_AS_DOUBLE(by)
            elif PyLong_Check(by) and not PyBool_Check(by):
                fby = <double>by
            else:
                raise ColumnTypeError(
                    f"incr on FLOAT column {column!r} of table {self.name!r} takes an int or "
                    f"float, got {type(by).__name__}")
            if not self._allow_nan and not isfinite(fby):
                raise NonFiniteFloatError(f"incr step {by!r} is not finite")
            rc = zt_incr_float(&self.t, k, <uint16_t>kn, self.cols, ci, fby, self._allow_nan, &fout)
            if rc == ZT_ENONFINITE:
                raise NonFiniteFloatError(
                    f"incr of column {column!r} of table {self.name!r} by {by!r} overflows to a "
                    f"non-finite value; the value stays {fout!r}")
            if rc != 0:
                _raise_rc(rc, f"incr {key!r} in table {self.name!r}")
            return fout
        raise ColumnTypeError(
            f"incr needs an INT or FLOAT column; {column!r} of table {self.name!r} is "
            f"{_TYPE_NAME[c.type]}")

    def decr(self, key, column, by=1):
        """Atomically subtract ``by``; the mirror of :meth:`incr`."""
        if PyLong_Check(by) and not PyBool_Check(by):
            return self.incr(key, column, -by)
        if PyFloat_Check(by):
            return self.incr(key, column, -by)
        return self.incr(key, column, by)  # raises the typed error for the bad step

    def compare_and_set(self, key, column, expected, new):
        """Atomically set ``column`` to ``new`` if it equals ``expected``; True when written.

        A missing row compares as the zero row (0, 0.0, ""), like :meth:`incr`, and is created
        only when the comparison succeeds.
        """
        cdef const char *k
        cdef Py_ssize_t kn
        cdef zt_delta e, d
        cdef int swapped = 0
        self._key(key, &k, &kn)
        ci = self._col(column)
        self._prepare(ci, expected, &e)
        self._prepare(ci, new, &d)
        held = (expected, new)  # keep both alive across a possible GIL release
        rc = zt_cas(&self.t, k, <uint16_t>kn, self.cols, &e, &d, &swapped)
        del held
        if rc != 0:
            if rc == ZT_EFULL:
                raise TableFullError(f"table {self.name!r} is full: {self.t.capacity} rows")
            _raise_rc(rc, f"compare_and_set {key!r} in table {self.name!r}")
        return bool(swapped)

    def delete(self, key):
        """Remove the row; True if it existed."""
        cdef const char *k
        cdef Py_ssize_t kn
        self._key(key, &k, &kn)
        rc = zt_delete(&self.t, k, <uint16_t>kn)
        if rc < 0:
            _raise_rc(rc, f"delete {key!r} from table {self.name!r}")
        if self.t.local_recoveries != self._seen_recoveries:
            self._note_recoveries()
        return rc == 1

    def clear(self):
        """Remove every row (locks one stripe at a time; readers never block)."""
        self._check_open()
        rc = zt_clear(&self.t)
        if rc < 0:
            _raise_rc(rc, f"clear table {self.name!r}")

    def items(self):
        """Iterate ``(key, row)`` over live rows, from any worker.

        Each row is a consistent snapshot; rows added or deleted meanwhile may or may not be
        seen, and a row present throughout is never skipped (rows never move).  Order is the
        order of the row pool, not insertion order.
        """
        return _TableIter(self, 2)

    def keys(self):
        """Iterate the keys of live rows (see :meth:`items`)."""
        return _TableIter(self, 0)

    def values(self):
        """Iterate the rows (see :meth:`items`)."""
        return _TableIter(self, 1)

    def __iter__(self):
        return _TableIter(self, 0)


cdef class _TableIter:
    cdef Table table
    cdef uint32_t pos
    cdef int mode
    cdef char *buf

    def __cinit__(self, Table table, int mode):
        table._check_open()
        self.table = table
        self.pos = 0
        self.mode = mode
        self.buf = <char *>malloc(table.t.row_size)
        if self.buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.buf)

    def __iter__(self):
        return self

    def __next__(self):
        cdef Table t = self.table
        cdef int rc
        t._check_open()
        while self.pos < zt_next_unused(&t.t) and self.pos < t.t.capacity:
            rc = zt_read_at(&t.t, self.pos, self.buf)
            if rc == ZT_EBUSYREAD:
                rc = zt_read_at_locked(&t.t, self.pos, self.buf)
                if rc == ZT_EBUSYREAD:
                    rc = 0  # still mid-write after settling: it is being rewritten right now
                elif rc < 0:
                    _raise_rc(rc, f"iterate table {t.name!r}")
            self.pos += 1
            if rc == 1:
                if self.mode == 0:
                    return t._key_obj(self.buf)
                if self.mode == 1:
                    return t._row_dict(self.buf)
                return (t._key_obj(self.buf), t._row_dict(self.buf))
        raise StopIteration


cdef class Atomic:
    """A lock-free signed 64-bit integer in shared memory, shared by every worker.

    ``increment``/``decrement``/``compare_and_set`` are single atomic instructions (a CAS loop
    that checks overflow first): a worker killed at any point never leaves it half-updated, and
    overflow raises IntegerOverflowError with the value unchanged.  Build it before workers
    start (``Counter(0, name=...)`` does) so every worker attaches to the same integer.
    """

    cdef _Mapping _map
    cdef int64_t *v
    cdef readonly object name
    cdef readonly object path
    cdef readonly bint created
    cdef object __weakref__
    cdef public object _owner

    def __cinit__(self, *args, **kwargs):
        self._map = _Mapping()
        self.v = NULL
        self.name = None
        self.path = None
        self.created = False
        self._owner = None

    def __init__(self, initial=0, *, name=None):
        from zeal_asgi.shm import segments as _segments
        _segments.open_atomic(self, name, self._check(initial, "initial"))

    @staticmethod
    def _segment_size():
        return sizeof(zt_atomic_seg) if sizeof(zt_atomic_seg) > 4096 else 4096

    def _map_new(self, int fd, size_t size, bytes nonce, long long initial):
        cdef uint64_t n[2]
        memcpy(n, PyBytes_AS_STRING(nonce), 16)
        self._map.map(fd, size)
        zt_atomic_init(<zt_atomic_seg *>self._map.base, size, n, initial)
        self.v = &(<zt_atomic_seg *>self._map.base).value
        self.created = True

    def _map_existing(self, int fd, size_t size):
        self._map.map(fd, size)
        cdef int rc = zt_atomic_check(<zt_atomic_seg *>self._map.base, size)
        if rc == 1:
            self._map.detach()
            return 1
        if rc != 0:
            self._map.detach()
            raise ShmAbiMismatchError(
                "shared-memory atomic is unusable: made by an incompatible build or corrupt")
        self.v = &(<zt_atomic_seg *>self._map.base).value
        return 0

    def _finish(self, name, path):
        self.name = name
        self.path = path

    def _detach(self):
        """Unmap a segment we will not use; the caller keeps the fd."""
        self._map.detach()
        self.v = NULL

    def _fileno(self):
        """The segment's file descriptor (kept open: its flock marks this process as a user)."""
        return self._map.fd

    cdef inline int64_t _check(self, object x, str what) except? -1:
        cdef int overflow = 0
        cdef long long v
        if not PyLong_Check(x) or PyBool_Check(x):
            raise ColumnTypeError(f"atomic {self.name!r}: {what} must be an int, got {type(x).__name__}")
        v = PyLong_AsLongLongAndOverflow(x, &overflow)
        if overflow:
            raise IntegerOverflowError(
                f"atomic {self.name!r}: {what} {x} is outside the signed 64-bit range")
        return v

    cdef inline int _open(self) except -1:
        if self.v == NULL:
            raise ShmError(f"atomic {self.name!r} is closed in this process")
        return 0

    @property
    def nonce(self):
        """Random identity of the segment: equal in every process that shares the atomic."""
        self._open()
        return PyBytes_FromStringAndSize(<char *>(<zt_atomic_seg *>self._map.base).nonce, 16).hex()

    def get(self):
        """The current value."""
        self._open()
        return zt_a_load(self.v)

    def set(self, value):
        """Store ``value``; returns None."""
        cdef int64_t x = self._check(value, "value")
        self._open()
        zt_a_store(self.v, x)

    def increment(self, by=1):
        """Add ``by`` atomically and return the new value; overflow raises, value unchanged."""
        cdef int64_t d = self._check(by, "step")
        cdef int64_t out
        self._open()
        if zt_a_add(self.v, d, &out) != 0:
            raise IntegerOverflowError(
                f"atomic {self.name!r}: {out} + {d} leaves the signed 64-bit range; unchanged")
        return out

    def decrement(self, by=1):
        """Subtract ``by`` atomically and return the new value; overflow raises."""
        cdef int64_t d = self._check(by, "step")
        cdef int64_t out
        self._open()
        if d == INT64_MIN:
            raise IntegerOverflowError(f"atomic {self.name!r}: cannot negate step {by}")
        if zt_a_add(self.v, -d, &out) != 0:
            raise IntegerOverflowError(
                f"atomic {self.name!r}: {out} - {d} leaves the signed 64-bit range; unchanged")
        return out

    def compare_and_set(self, expected, new):
        """Set to ``new`` if the value equals ``expected``; True when it did."""
        cdef int64_t e = self._check(expected, "expected")
        cdef int64_t n = self._check(new, "new")
        self._open()
        return bool(zt_a_cas(self.v, e, n))

    def reset(self):
        """Set to 0."""
        self._open()
        zt_a_store(self.v, 0)

    def close(self):
        """Unmap in this process (other processes keep it).  Idempotent."""
        self.v = NULL
        self._map.unmap()

    @property
    def closed(self):
        """True once ``close()`` unmapped the atomic in this process."""
        return self.v == NULL

    def __repr__(self):
        if self.v == NULL:
            return f"<Atomic {self.name!r} closed>"
        return f"<Atomic {self.name!r} value={zt_a_load(self.v)}>"

    def __reduce__(self):
        raise TypeError(
            "an Atomic is bound to its shared-memory mapping and cannot be pickled; "
            "declare it (Counter(0, name=...)) in the app module so every worker attaches by name")


# -- cells ------------------------------------------------------------------------------------

cdef extern from "zt_core.h" nogil:
    int zt_row_ref(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, char **row)
    double zt_cell_get(const uint64_t *p)
    void zt_cell_set(uint64_t *p, double v)
    int zt_cell_add(uint64_t *p, double by)
    int zt_cell_observe(uint64_t **cells, const double *bounds, int n, double v)

cdef extern from "Python.h":
    bint PyFloat_CheckExact(object o)
    double PyFloat_AsDouble(object o) except? -1.0


cdef class Cells:
    """The FLOAT columns of a few rows of a Table, located once, then updated in place with
    lock-free atomics (no lock, no lookup): the cells, in key order and column order.

    ``Cells(table, keys)`` creates the missing rows (zeroed).  Every column of ``table`` must be
    FLOAT.  Rows used through cells must never be written through the table's own methods nor
    deleted while another process may hold cells on them (see ``zt_core.h``).  ``monotonic``
    cells refuse a negative step; ``bounds`` (ascending, the last +inf) makes the first
    ``len(bounds)`` cells a histogram's buckets and the next one its sum (:meth:`observe`).
    A step or a sum that is not finite is refused with the cell unchanged.
    """

    cdef Table table
    cdef uint64_t **p
    cdef double *bounds
    cdef int n
    cdef int nb
    cdef readonly bint monotonic

    def __cinit__(self, Table table, keys, bounds=None, bint monotonic=False):
        cdef const char *k
        cdef Py_ssize_t kn
        cdef char *row
        cdef int i, j, rc
        keys = list(keys)
        for i in range(table.ncols):
            if table.cols[i].type != ZT_FLOAT:
                raise ColumnTypeError(f"cells need FLOAT columns; table {table.name!r} has others")
        self.table = table
        self.monotonic = monotonic
        self.n = len(keys) * table.ncols
        self.p = <uint64_t **>malloc(max(self.n, 1) * sizeof(uint64_t *))
        if self.p == NULL:
            raise MemoryError()
        for j, key in enumerate(keys):
            table._key(key, &k, &kn)
            rc = zt_row_ref(&table.t, k, <uint16_t>kn, table.cols, &row)
            if rc != 0:
                _raise_rc(rc, f"cells of {key!r} in table {table.name!r}")
            for i in range(table.ncols):
                self.p[j * table.ncols + i] = <uint64_t *>(row + table.cols[i].offset)
        if bounds is None:
            return
        bounds = [float(b) for b in bounds]
        # (wraparound is off in this module: no negative indexes)
        if not bounds or bounds[len(bounds) - 1] != float("inf") or len(bounds) >= self.n or any(
                not a < b for a, b in zip(bounds, bounds[1:])):
            raise _errors.MetricError(
                f"bounds must ascend to +inf and leave a sum cell; got {bounds}")
        self.nb = len(bounds)
        self.bounds = <double *>malloc(self.nb * sizeof(double))
        if self.bounds == NULL:
            raise MemoryError()
        for i in range(self.nb):
            self.bounds[i] = bounds[i]

    def __dealloc__(self):
        free(self.p)
        free(self.bounds)

    cdef inline int _open(self) except -1:
        if self.table._map.base == NULL:
            raise ShmError(f"table {self.table.name!r} of these cells is closed in this process")
        return 0

    cdef inline double _num(self, object x) except? -1.0:
        self._open()
        if PyFloat_CheckExact(x):
            return PyFloat_AS_DOUBLE(x)
        try:
            return PyFloat_AsDouble(x)  # a number (int, float, or anything with __float__), no str
        except TypeError:
            raise ColumnTypeError(f"a cell holds a number; got {type(x).__name__}") from None
        except OverflowError:
            raise NonFiniteFloatError(f"{x!r} is beyond a double's range") from None

    def inc(self, by=1):
        """Add ``by`` to the first cell (atomically, across processes)."""
        cdef double d = self._num(by)
        if self.monotonic and d < 0:
            raise _errors.MetricError(f"these cells only go up; got a step of {by!r}")
        if zt_cell_add(self.p[0], d) != 0:
            raise NonFiniteFloatError(f"a step of {by!r} would leave the cell non-finite; unchanged")

    def set(self, value):
        """Store ``value`` (finite) in the first cell; refused on monotonic cells."""
        cdef double d = self._num(value)
        if self.monotonic:
            raise _errors.MetricError("monotonic cells only go up: set() is refused")
        if not isfinite(d):
            raise NonFiniteFloatError(f"a cell holds a finite number; got {value!r}")
        zt_cell_set(self.p[0], d)

    def observe(self, value):
        """Count ``value`` in its bucket and add it to the sum (needs ``bounds``)."""
        cdef double d = self._num(value)
        if self.nb == 0:
            raise _errors.MetricError("observe() needs cells made with bounds")
        if zt_cell_observe(self.p, self.bounds, self.nb, d) != 0:
            raise NonFiniteFloatError(f"{value!r} would leave the sum non-finite; not counted")

    def get(self, int i=0):
        """The value of cell ``i``."""
        self._open()
        if not 0 <= i < self.n:
            raise IndexError(f"cell {i} of {self.n}")
        return zt_cell_get(self.p[i])

    def values(self):
        """Every cell's value, in order."""
        self._open()
        return [zt_cell_get(self.p[i]) for i in range(self.n)]

    def __len__(self):
        return self.n

    def __getitem__(self, int i):
        return self.get(i)

    def __reduce__(self):
        raise TypeError("cells are bound to a mapping of this process and cannot be pickled")
