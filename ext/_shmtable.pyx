# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: autotestdict=False, embedsignature=False, initializedcheck=False, auto_pickle=False
"""The compiled core: the table and the atomic on a mapping of a file descriptor it is given.

It owns data and locks only.  Which segment to use, how it is named, created, attached and
removed is decided in Python (``zeal_asgi.shm.segments``), which hands over an open descriptor
with the geometry; the public ``zeal_asgi.Table`` and ``zeal_asgi.Atomic`` are thin subclasses
that do so in their constructors.  See ``zt_core.h`` for the layout and the locking rules.
Python objects are converted before any lock is taken and built after every lock is released.
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
from posix.unistd cimport close as c_close

import logging
import os
import re
import signal

from zeal_asgi import errors as _errors
from zeal_asgi.shm.schema import validate_key, validate_value

cdef extern from "sys/mman.h":
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int PROT_READ, PROT_WRITE, MAP_SHARED
    void *MAP_FAILED

cdef extern from "errno.h":
    int errno

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object o, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    bint PyBool_Check(object o)

cdef extern from "zt_core.h" nogil:
    int ZT_OK, ZT_ETIMEDOUT, ZT_EFULL, ZT_EOVERFLOW, ZT_ENONFINITE, ZT_EBUSYREAD
    int ZT_INT, ZT_FLOAT, ZT_STRING, ZT_BYTES, ZT_MAX_COLUMNS, ZT_FAULTS

    ctypedef struct zt_ident:
        uint64_t nonce[2]

    ctypedef struct zt_geometry:
        uint32_t capacity, row_size, key_limit, key_off, n_stripes, exp_off
        int64_t ttl_ns
        uint64_t index_slots, off_global, off_stripes, off_index, off_rows, total_size

    ctypedef struct zt_header:
        zt_ident id
        int64_t row_count, dead_rows, lock_recoveries, rows_lost, lock_timeouts
        int64_t read_fallbacks, inserts, deletes
        char schema[1]
        uint32_t schema_len

    ctypedef struct zt_table:
        zt_header *hdr
        zt_geometry g
        int64_t lock_timeout_ns, local_recoveries

    ctypedef struct zt_col:
        uint8_t type, width
        uint32_t offset, size

    ctypedef struct zt_delta:
        int col
        int64_t i
        double f
        const char *s
        uint32_t slen

    ctypedef struct zt_atomic_seg:
        zt_ident id
        int64_t value

    int zt_init(zt_table *t, char *base, const zt_geometry *g, const char *schema, uint32_t n)
    int zt_check(const char *base, size_t size)
    void zt_bind(zt_table *t, char *base)
    int zt_get(zt_table *t, const char *key, uint16_t klen, char *copy)
    int zt_set(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
               const zt_delta *d, int nd)
    int zt_incr(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
                const zt_delta *d, int is_int, int allow_nonfinite, int64_t *out_i, double *out_f)
    int zt_cas(zt_table *t, const char *key, uint16_t klen, const zt_col *cols,
               const zt_delta *expected, const zt_delta *desired, int *swapped)
    int zt_remove(zt_table *t, const char *key, uint16_t klen, int only_expired,
                  const zt_col *cols, const zt_delta *expect)
    int zt_clear(zt_table *t)
    int64_t zt_count(zt_table *t)
    int zt_read_at(zt_table *t, uint32_t r, char *copy)
    int zt_read_at_locked(zt_table *t, uint32_t r, char *copy)
    int64_t zt_get_int(const char *row, const zt_col *c)
    double zt_get_float(const char *row, const zt_col *c)
    uint32_t zt_get_slen(const char *row, const zt_col *c)
    const char *zt_get_sptr(const char *row, const zt_col *c)
    uint16_t zt_keylen(const char *row)
    int zt_robust_supported()
    void zt_abi_tag(char *out)
    void zt_arm_crashpoint(int id, long nth, int sig)

    int zt_atomic_init(zt_atomic_seg *a, size_t size, int64_t v)
    int zt_atomic_check(const zt_atomic_seg *a, size_t size)
    int64_t zt_a_load(int64_t *p)
    void zt_a_store(int64_t *p, int64_t v)
    int zt_a_add(int64_t *p, int64_t d, int64_t *out)
    int zt_a_cas(int64_t *p, int64_t expect, int64_t desired)

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

cdef object UnknownColumnError = _errors.UnknownColumnError
cdef object ColumnTypeError = _errors.ColumnTypeError
cdef object IntegerOverflowError = _errors.IntegerOverflowError
cdef object NonFiniteFloatError = _errors.NonFiniteFloatError
cdef object InvalidKeyError = _errors.InvalidKeyError
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
_log = logging.getLogger("zeal_asgi.shm")

ATOMIC_SIZE = 4096
"""Bytes of an atomic's segment (one page)."""

FAULT_INJECTION = bool(ZT_FAULTS)
"""True only in a test build (compiled with -DZT_FAULT_INJECTION): crash points exist."""


def robust_mutexes_supported():
    """True when this libc builds robust, process-shared mutexes (read back from the attrs)."""
    return bool(zt_robust_supported())


def abi_tag():
    """The ABI tag written into every segment header; attach refuses a different one."""
    cdef char buf[64]
    zt_abi_tag(buf)
    return buf.decode()


def _set_crashpoint(int point, long nth, int sig):
    """Arm a deterministic crash point (test builds only): raise `sig` on the nth hit."""
    if not ZT_FAULTS:
        raise RuntimeError("this build has no crash points (build with CFLAGS=-DZT_FAULT_INJECTION)")
    zt_arm_crashpoint(point, nth, sig)


if ZT_FAULTS and os.environ.get("ZEAL_CRASH_AT"):
    # ZEAL_CRASH_AT=<point>:<nth>[:stop]: raise SIGKILL (or SIGSTOP) at the nth time the C code
    # passes crash point <point> (the points are listed in zt_core.h)
    _spec = re.fullmatch(r"(\d+)(?::(\d+))?(:stop)?", os.environ["ZEAL_CRASH_AT"])
    if _spec is None:
        raise _errors.ConfigError(
            f"ZEAL_CRASH_AT must be <point>[:<nth>][:stop], got {os.environ['ZEAL_CRASH_AT']!r}")
    zt_arm_crashpoint(int(_spec[1]), int(_spec[2] or 1),
                      signal.SIGSTOP if _spec[3] else signal.SIGKILL)


cdef inline void _raise_rc(int rc, str what) except *:
    if rc == ZT_ETIMEDOUT:
        raise LockTimeoutError(
            f"{what}: row lock not obtained within the lock timeout; another process holds it "
            "and is not progressing (stopped or stuck); it was not force-unlocked")
    if rc == ZT_EFULL:
        raise TableFullError(what)
    raise ShmError(f"{what}: lock error (code {rc})")


cdef inline void _raise_unusable(int rc, str what) except *:
    reason = {2: "made by an incompatible build (ABI or layout differs)",
              3: "its header checksum is wrong (corrupt or foreign)",
              4: "its size does not match its header"}[rc]
    raise ShmAbiMismatchError(f"shared-memory {what} is unusable: {reason}")


cdef class _Mapping:
    """An mmap of a segment fd, owned by one Table or Atomic (which then owns the fd too)."""
    cdef char *base
    cdef size_t size
    cdef int fd

    def __cinit__(self):
        self.base = NULL
        self.fd = -1

    cdef char *map(self, int fd, size_t size) except NULL:
        cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise OSError(errno, os.strerror(errno), "mmap")
        self.base = <char *>p
        self.size = size
        self.fd = fd
        return self.base

    cdef void unmap(self, bint close_fd):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL
        if close_fd and self.fd >= 0:
            c_close(self.fd)
        self.fd = -1

    def __dealloc__(self):
        self.unmap(True)


cdef class Table:
    """The compiled table; ``zeal_asgi.Table`` is the public subclass that opens its segment."""

    cdef zt_table t
    cdef _Mapping _map
    cdef zt_col cols[64]
    cdef int ncols
    cdef dict _colidx
    cdef tuple _names
    cdef object _schema
    cdef bint _allow_nan
    cdef bint _binary_keys
    cdef int64_t _seen_recoveries
    cdef readonly object name
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._map = _Mapping()
        self._colidx = {}
        self._names = ()
        self.t.hdr = NULL
        self.t.lock_timeout_ns = 1000000000

    # -- set-up, driven by zeal_asgi.shm.segments ----------------------------------------------

    def _init(self, int fd, geometry, bytes schema_blob):
        """Map ``fd`` (sized and reserved by the caller) and initialise a new table in it."""
        cdef zt_geometry g
        (g.capacity, g.row_size, g.key_limit, g.key_off, g.n_stripes, g.exp_off, g.ttl_ns,
         g.index_slots, g.off_global, g.off_stripes, g.off_index, g.off_rows, g.total_size) = geometry
        cdef char *base = self._map.map(fd, g.total_size)
        cdef int rc = zt_init(&self.t, base, &g, PyBytes_AS_STRING(schema_blob),
                              <uint32_t>PyBytes_GET_SIZE(schema_blob))
        if rc != 0:
            self._unmap()
            raise OSError(rc, "initialising the table: " + os.strerror(rc))

    def _attach(self, int fd, size_t size):
        """Map and validate a table made by another process: its stored schema blob, or
        ``None`` (unmapped again) when its creator has not finished initialising it."""
        cdef int rc = zt_check(self._map.map(fd, size), size)
        if rc != 0:
            self._unmap()
            if rc == 1:
                return None
            _raise_unusable(rc, "segment")
        zt_bind(&self.t, self._map.base)
        return PyBytes_FromStringAndSize(self.t.hdr.schema, self.t.hdr.schema_len)

    def _unmap(self):
        """Unmap a segment this table will not use; the caller keeps the fd."""
        self._map.unmap(False)
        self.t.hdr = NULL

    def _fileno(self):
        """The segment's file descriptor (kept open: its flock marks this process as a user)."""
        return self._map.fd

    def _bind(self, schema, name, double lock_timeout):
        """Bind the process-local column descriptors (after the schema was checked)."""
        if len(schema.columns) > ZT_MAX_COLUMNS:
            raise _errors.SchemaError(f"a table has at most {ZT_MAX_COLUMNS} columns")
        self.name = name
        self._schema = schema
        self.lock_timeout = lock_timeout
        self._colidx = {}
        for i, c in enumerate(schema.columns):
            self.cols[i].type = int(c.type)
            self.cols[i].width = c.width
            self.cols[i].offset = c.offset
            self.cols[i].size = c.size
            self._colidx[c.name] = i
        self.ncols = len(schema.columns)
        self._names = tuple(c.name for c in schema.columns)
        self._allow_nan = schema.allow_nan
        self._binary_keys = schema.binary_keys

    # -- properties ---------------------------------------------------------------------------

    @property
    def capacity(self):
        """Rows that fit: exactly the ``max_rows`` the table was made with."""
        self._check_open()
        return self.t.g.capacity

    @property
    def memory_bytes(self):
        """Bytes of shared memory reserved for the table (header, locks, index and rows)."""
        self._check_open()
        return self.t.g.total_size

    @property
    def nonce(self):
        """Random identity of the segment: equal in every process that shares the table."""
        self._check_open()
        return PyBytes_FromStringAndSize(<char *>self.t.hdr.id.nonce, 16).hex()

    @property
    def columns(self):
        """Column names in declaration order."""
        return self._names

    @property
    def closed(self):
        """True once ``close()`` unmapped the table in this process."""
        return self.t.hdr == NULL

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
        return self.count()

    def count(self):
        """Number of rows (O(1), shared by every process)."""
        self._check_open()
        return zt_count(&self.t)

    def stats(self):
        """Counters of the shared table (rows, capacity, memory, lock recoveries, ...)."""
        self._check_open()
        cdef zt_header *h = self.t.hdr
        return {
            "rows": zt_count(&self.t),
            "capacity": self.t.g.capacity,
            "memory_bytes": self.t.g.total_size,
            "row_size": self.t.g.row_size,
            "key_limit": self.t.g.key_limit,
            "index_slots": self.t.g.index_slots,
            "stripes": self.t.g.n_stripes,
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
        self._map.unmap(True)
        self.t.hdr = NULL

    def __repr__(self):
        if self.t.hdr == NULL:
            return f"<Table {self.name!r} closed>"
        return f"<Table {self.name!r} rows={zt_count(&self.t)} capacity={self.t.g.capacity}>"

    def __reduce__(self):
        raise TypeError(
            "a Table is bound to its shared-memory mapping and cannot be pickled; "
            "declare it with Store.make() in the app module so every worker attaches by name")

    # -- internals ----------------------------------------------------------------------------

    cdef inline int _check_open(self) except -1:
        if self.t.hdr == NULL:
            raise ShmError(f"table {self.name!r} is closed in this process")
        return 0

    cdef inline const char *_key(self, object key, Py_ssize_t *n) except NULL:
        """The bytes of ``key`` (``n``: their length), or raise the schema's typed refusal."""
        cdef const char *p = NULL
        if self.t.hdr == NULL:
            self._check_open()
        n[0] = 0
        if PyUnicode_Check(key):
            try:
                p = PyUnicode_AsUTF8AndSize(key, n)
            except UnicodeEncodeError:
                n[0] = 0
        elif PyBytes_Check(key):
            p = PyBytes_AS_STRING(key)
            n[0] = PyBytes_GET_SIZE(key)
            if not self._binary_keys:
                try:
                    (<bytes>key).decode("utf-8")
                except UnicodeDecodeError:
                    n[0] = 0
        if 0 < n[0] <= self.t.g.key_limit:
            return p
        # A refusal: the schema's rules raise it, the same typed error every backend raises.
        validate_key(key, self.name, self.t.g.key_limit, self._binary_keys)
        raise InvalidKeyError(f"key {key!r} of table {self.name!r}")  # (not reached)

    cdef inline int _col(self, object column) except -1:
        cdef PyObject *o = PyDict_GetItem(self._colidx, column)
        if o == NULL:
            raise UnknownColumnError(
                f"table {self.name!r} has no column {column!r}; columns: {list(self._names)}")
        return <int><object>o

    cdef int _prepare(self, int ci, object value, zt_delta *d) except -1:
        """Fill d with `value` for column ci, or raise naming the column and the limit."""
        cdef zt_col *c = &self.cols[ci]
        cdef int overflow = 0
        cdef Py_ssize_t n = -1
        d.col = ci
        if c.type == ZT_INT:
            if PyLong_Check(value) and not PyBool_Check(value):
                d.i = PyLong_AsLongLongAndOverflow(value, &overflow)
                if not overflow and INT_MIN[c.width] <= d.i <= INT_MAX[c.width]:
                    return 0
        elif c.type == ZT_FLOAT:
            if PyFloat_Check(value):
                d.f = PyFloat_AS_DOUBLE(value)
                if self._allow_nan or isfinite(d.f):
                    return 0
            elif PyLong_Check(value) and not PyBool_Check(value):
                try:
                    d.f = <double>value
                except OverflowError:
                    d.f = 0.5  # equal to no int: refused below
                if <object>d.f == value:
                    return 0
        elif c.type == ZT_STRING:
            if PyUnicode_Check(value):
                try:
                    d.s = PyUnicode_AsUTF8AndSize(value, &n)
                except UnicodeEncodeError:
                    n = -1
        elif PyBytes_Check(value):
            d.s = PyBytes_AS_STRING(value)
            n = PyBytes_GET_SIZE(value)
        if 0 <= n <= c.size:
            d.slen = <uint32_t>n
            return 0
        # A refusal: the schema's rules raise it, the same typed error every backend raises.
        validate_value(self._schema.columns[ci], value, self.name, self._allow_nan)
        raise ColumnTypeError(f"{self._what(ci)}: {value!r}")  # (not reached)

    cdef int _twice(self, int ci, col) except -1:
        raise ColumnTypeError(
            f"a row of table {self.name!r} names column {self._names[ci]!r} twice (key {col!r} "
            "is a second spelling of it)")

    cdef str _what(self, int ci):
        return f"column {self._names[ci]!r} of table {self.name!r}"

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
            return PyBytes_FromStringAndSize(row + self.t.g.key_off, n)
        return PyUnicode_DecodeUTF8(row + self.t.g.key_off, n, "strict")

    cdef inline int _done(self, int rc, key, str op) except -1:
        """Raise for a failed operation; log a lock recovery this process just ran."""
        if rc >= 0 and self.t.local_recoveries == self._seen_recoveries:
            return 0  # the common case, checked before any call
        return self._fail(rc, key, op)

    cdef int _fail(self, int rc, key, str op) except -1:
        if rc < 0:
            if rc == ZT_EFULL:
                raise TableFullError(
                    f"table {self.name!r} is full: {self.t.g.capacity} rows (max_rows); delete "
                    "rows or make it larger")
            _raise_rc(rc, f"{op} {key!r} in table {self.name!r}")
        if self.t.local_recoveries != self._seen_recoveries:
            self._seen_recoveries = self.t.local_recoveries
            _log.warning(
                "table %r: recovered a lock whose holder died (recoveries=%d, rows lost=%d)",
                self.name, zt_load64(&self.t.hdr.lock_recoveries), zt_load64(&self.t.hdr.rows_lost))
        return 0

    # -- the API ------------------------------------------------------------------------------

    cdef inline char *_buffer(self, uint64_t *stackbuf) except NULL:
        """Room for a row copy: ``stackbuf`` when it fits, else the heap (caller frees)."""
        if stackbuf != NULL and self.t.g.row_size <= STACK_ROW_WORDS * 8:
            return <char *>stackbuf
        cdef char *buf = <char *>malloc(self.t.g.row_size)
        if buf == NULL:
            raise MemoryError()
        return buf

    def get(self, key, field=None):
        """The row as a dict (declaration order), or one field's value; ``None`` when missing.

        Raises:
            UnknownColumnError: ``field`` is not a column.
        """
        cdef uint64_t stackbuf[STACK_ROW_WORDS]
        cdef Py_ssize_t kn
        cdef int rc, ci = -1
        cdef const char *k = self._key(key, &kn)
        if field is not None:
            ci = self._col(field)
        cdef char *buf = self._buffer(stackbuf)
        try:
            rc = zt_get(&self.t, k, <uint16_t>kn, buf)
            self._done(rc, key, "get")
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
        cdef uint64_t stackbuf[STACK_ROW_WORDS]
        cdef Py_ssize_t kn
        cdef int rc
        cdef const char *k = self._key(key, &kn)
        cdef char *buf = self._buffer(stackbuf)
        rc = zt_get(&self.t, k, <uint16_t>kn, buf)
        if buf != <char *>stackbuf:
            free(buf)
        self._done(rc, key, "exists")
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
        cdef Py_ssize_t kn
        cdef zt_delta deltas[64]
        cdef PyObject *held[64]
        cdef uint64_t seen = 0
        cdef int nd = 0, nheld = 0, i, ci, rc = 0
        cdef dict r
        cdef const char *k = self._key(key, &kn)
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
                # One delta per column: the arrays hold one per column and no more (two keys may
                # compare equal to one column name, e.g. str subclasses).
                if seen & (1ULL << ci):
                    self._twice(ci, col)
                seen |= 1ULL << ci
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
        self._done(rc, key, "set")
        return True

    def incr(self, key, column, by=1):
        """Atomically add ``by`` to a numeric column and return the new value.

        A missing row is created (zeroed) first.  INT columns take an int ``by`` and raise
        IntegerOverflowError past the column's range, leaving the value unchanged; FLOAT
        columns take an int or float and refuse a non-finite result.
        """
        cdef Py_ssize_t kn
        cdef int overflow = 0, rc
        cdef zt_delta d
        cdef int64_t iout = 0
        cdef double fout = 0.0
        cdef const char *k = self._key(key, &kn)
        d.col = self._col(column)
        cdef zt_col *c = &self.cols[d.col]
        d.i = 0
        d.f = 0.0
        if c.type == ZT_INT and PyLong_Check(by) and not PyBool_Check(by):
            d.i = PyLong_AsLongLongAndOverflow(by, &overflow)
            if overflow:
                raise IntegerOverflowError(
                    f"incr of {self._what(d.col)} by {by}: the step is outside the signed "
                    "64-bit range")
            rc = zt_incr(&self.t, k, <uint16_t>kn, self.cols, &d, 1, 0, &iout, &fout)
            if rc == ZT_EOVERFLOW:
                raise IntegerOverflowError(
                    f"incr of {self._what(d.col)} by {by} would leave [{INT_MIN[c.width]}, "
                    f"{INT_MAX[c.width]}] (INT({c.width})); the value stays {iout}")
            self._done(rc, key, "incr")
            return iout
        if c.type == ZT_INT:
            raise ColumnTypeError(
                f"incr on INT column {column!r} of table {self.name!r} takes an int, got "
                f"{type(by).__name__}")
        if c.type != ZT_FLOAT:
            raise ColumnTypeError(
                f"incr needs an INT or FLOAT column; {column!r} of table {self.name!r} is "
                f"{_TYPE_NAME[c.type]}")
        if PyFloat_Check(by):
            d.f = PyFloat_AS_DOUBLE(by)
        elif PyLong_Check(by) and not PyBool_Check(by):
            try:
                d.f = <double>by
            except OverflowError:
                raise IntegerOverflowError(
                    f"incr of {self._what(d.col)} by {by}: the step is outside the range of a "
                    "float") from None
        else:
            raise ColumnTypeError(
                f"incr on FLOAT column {column!r} of table {self.name!r} takes an int or float, "
                f"got {type(by).__name__}")
        if not self._allow_nan and not isfinite(d.f):
            raise NonFiniteFloatError(f"incr step {by!r} is not finite")
        rc = zt_incr(&self.t, k, <uint16_t>kn, self.cols, &d, 0, self._allow_nan, &iout, &fout)
        if rc == ZT_ENONFINITE:
            raise NonFiniteFloatError(
                f"incr of {self._what(d.col)} by {by!r} overflows to a non-finite value; the "
                f"value stays {fout!r}")
        self._done(rc, key, "incr")
        return fout

    def decr(self, key, column, by=1):
        """Atomically subtract ``by``; the mirror of :meth:`incr`."""
        if (PyLong_Check(by) and not PyBool_Check(by)) or PyFloat_Check(by):
            return self.incr(key, column, -by)
        return self.incr(key, column, by)  # raises the typed error for the bad step

    def compare_and_set(self, key, column, expected, new):
        """Atomically set ``column`` to ``new`` if it equals ``expected``; True when written.

        A missing row compares as the zero row (0, 0.0, ""), like :meth:`incr`, and is created
        only when the comparison succeeds.
        """
        cdef Py_ssize_t kn
        cdef zt_delta e, d
        cdef int swapped = 0
        cdef const char *k = self._key(key, &kn)
        ci = self._col(column)
        self._prepare(ci, expected, &e)
        self._prepare(ci, new, &d)
        rc = zt_cas(&self.t, k, <uint16_t>kn, self.cols, &e, &d, &swapped)
        self._done(rc, key, "compare_and_set")
        return bool(swapped)

    def delete(self, key):
        """Remove the row; True if it existed."""
        cdef Py_ssize_t kn
        cdef const char *k = self._key(key, &kn)
        rc = zt_remove(&self.t, k, <uint16_t>kn, 0, NULL, NULL)
        self._done(rc, key, "delete")
        return rc == 1

    def delete_if(self, key, column, expected):
        """Remove the row only if ``column`` still holds ``expected``, in one locked step; True
        when removed.

        The delete of a row judged stale from an earlier read: a writer that changed the column
        since (a new lease, a new window) keeps its row.  A missing row is not removed (False).
        """
        cdef Py_ssize_t kn
        cdef zt_delta e
        cdef const char *k = self._key(key, &kn)
        ci = self._col(column)
        self._prepare(ci, expected, &e)
        rc = zt_remove(&self.t, k, <uint16_t>kn, 0, self.cols, &e)
        self._done(rc, key, "delete_if")
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
        self.buf = table._buffer(NULL)

    def __dealloc__(self):
        free(self.buf)

    def __iter__(self):
        return self

    def __next__(self):
        cdef Table t = self.table
        cdef int rc
        t._check_open()
        while self.pos < zt_next_unused(&t.t) and self.pos < t.t.g.capacity:
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
    """The compiled atomic; ``zeal_asgi.Atomic`` is the public subclass that opens its segment."""

    cdef _Mapping _map
    cdef int64_t *v
    cdef readonly object name
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        self._map = _Mapping()
        self.v = NULL

    def _init(self, int fd, long long initial):
        """Map ``fd`` (ATOMIC_SIZE bytes, reserved by the caller) and initialise it."""
        cdef int rc = zt_atomic_init(<zt_atomic_seg *>self._map.map(fd, ATOMIC_SIZE), ATOMIC_SIZE,
                                     initial)
        if rc != 0:
            self._unmap()
            raise OSError(rc, "initialising the atomic: " + os.strerror(rc))
        self.v = &(<zt_atomic_seg *>self._map.base).value

    def _attach(self, int fd, size_t size):
        """Map and validate an atomic made by another process; False (unmapped again) when its
        creator has not finished initialising it."""
        cdef int rc = zt_atomic_check(<zt_atomic_seg *>self._map.map(fd, size), size)
        if rc != 0:
            self._unmap()
            if rc == 1:
                return False
            _raise_unusable(rc, "atomic")
        self.v = &(<zt_atomic_seg *>self._map.base).value
        return True

    def _unmap(self):
        """Unmap a segment this atomic will not use; the caller keeps the fd."""
        self._map.unmap(False)
        self.v = NULL

    def _fileno(self):
        """The segment's file descriptor (kept open: its flock marks this process as a user)."""
        return self._map.fd

    def _bind(self, name):
        """Name the atomic (for messages)."""
        self.name = name

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
        return PyBytes_FromStringAndSize(<char *>(<zt_atomic_seg *>self._map.base).id.nonce, 16).hex()

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
        self._map.unmap(True)

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


# -- bounded increment (appended: rate limiting and other quotas) ------------------------------

cdef extern from "zt_core.h" nogil:
    int zt_incr_bounded(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, int ci,
                        const zt_delta *by, const zt_delta *bound, const zt_delta *floor_,
                        const zt_delta *reset_, int allow_nonfinite, int64_t *out_i,
                        double *out_f, int *applied)


cdef int _bounded_arg(Table table, int ci, object column, str what, object value,
                      zt_delta *d) except -1:
    cdef zt_col *c = &table.cols[ci]
    cdef int overflow = 0
    d.col = ci
    if c.type == ZT_INT:
        if not PyLong_Check(value) or PyBool_Check(value):
            raise ColumnTypeError(
                f"incr_bounded on INT column {column!r} of table {table.name!r}: {what} is an "
                f"int, got {type(value).__name__}")
        d.i = PyLong_AsLongLongAndOverflow(value, &overflow)
        if overflow:
            raise IntegerOverflowError(
                f"incr_bounded on column {column!r} of table {table.name!r}: {what} {value} is "
                "outside the signed 64-bit range")
        return 0
    if (PyLong_Check(value) or PyFloat_Check(value)) and not PyBool_Check(value):
        d.f = <double>value
        if not isfinite(d.f) and what != "bound":
            raise NonFiniteFloatError(
                f"incr_bounded on column {column!r} of table {table.name!r}: {what} {value!r} "
                "is not finite")
        return 0
    raise ColumnTypeError(
        f"incr_bounded on FLOAT column {column!r} of table {table.name!r}: {what} is a number, "
        f"got {type(value).__name__}")


def incr_bounded(Table table, key, column, by, bound, floor=None, reset=None):
    """Atomically add ``by`` to a numeric column only when the result stays ``<= bound``.

    With ``floor``, a value below it is first replaced by ``reset`` (by ``floor`` itself when
    ``reset`` is None: ``max(value, floor) + by``), so a stale deadline counts as now or an ended
    window starts again in the same step.  A missing row counts as zero and is created only
    when the add applies.  Returns
    ``(value, applied)``: the new value when applied, else the value as it is (0 for no row).
    One locked step: no other writer of the row runs between the comparison and the write.

    Raises:
        UnknownColumnError, ColumnTypeError: ``column`` is not a numeric column, or an argument
            is not a number of the column's kind.
        IntegerOverflowError, NonFiniteFloatError: the result would not fit the column (the row
            is unchanged).
    """
    cdef Py_ssize_t kn
    cdef int ci, rc, applied = 0
    cdef int64_t iout = 0
    cdef double fout = 0.0
    cdef zt_delta dby, dbound, dfloor, dreset
    cdef const char *k = table._key(key, &kn)
    ci = table._col(column)
    if table.cols[ci].type != ZT_INT and table.cols[ci].type != ZT_FLOAT:
        raise ColumnTypeError(
            f"incr_bounded needs a numeric column; {column!r} of table {table.name!r} is not")
    _bounded_arg(table, ci, column, "by", by, &dby)
    _bounded_arg(table, ci, column, "bound", bound, &dbound)
    if floor is not None:
        _bounded_arg(table, ci, column, "floor", floor, &dfloor)
    if reset is not None:
        if floor is None:
            raise ColumnTypeError(
                f"incr_bounded on column {column!r} of table {table.name!r}: reset replaces a "
                "value below floor; pass a floor too")
        _bounded_arg(table, ci, column, "reset", reset, &dreset)
    rc = zt_incr_bounded(&table.t, k, <uint16_t>kn, table.cols, ci, &dby, &dbound,
                         &dfloor if floor is not None else NULL,
                         &dreset if reset is not None else NULL, table._allow_nan,
                         &iout, &fout, &applied)
    if rc == ZT_EOVERFLOW:
        raise IntegerOverflowError(
            f"incr_bounded of column {column!r} of table {table.name!r} by {by} would leave "
            f"the column's range (INT({table.cols[ci].width})); the value stays {iout}")
    if rc == ZT_ENONFINITE:
        raise NonFiniteFloatError(
            f"incr_bounded of column {column!r} of table {table.name!r} by {by!r} gives a "
            "non-finite value; the row is unchanged")
    table._done(rc, key, "incr_bounded")
    if table.cols[ci].type == ZT_INT:
        return (PyLong_FromLongLong(iout), applied != 0)
    return (PyFloat_FromDouble(fout), applied != 0)


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
    FLOAT, and its rows must never expire (no ttl).  Rows used through cells must never be written through the table's own methods nor
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
        if not keys or not table.ncols:  # (no cell to update: inc() would write through nothing)
            raise _errors.MetricError(f"cells need a key and a column; got keys {keys}")
        if table.t.g.exp_off != 0:
            # a cell write renews no expiry, and an expired row is freed and reused for another key
            raise ColumnTypeError(
                f"cells need rows that never expire; table {table.name!r} has a ttl")
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
            k = table._key(key, &kn)
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


# -- leases (appended: zeal_asgi.shm.lease and the host locks) ---------------------------------

cdef extern from "zt_core.h" nogil:
    int64_t ZT_LEASE_TAG_MASK, ZT_LEASE_BUSY_OWNER, ZT_LEASE_BUSY_TURN
    int zt_lease_acquire(zt_table *t, const char *key, uint16_t klen, const zt_col *cols, int oc,
                         int64_t ms, int64_t tag, int64_t stale, int fc, int tc, int64_t turn_ms,
                         int64_t stale_turn, int64_t *out_word, int64_t *out_fence)

cdef extern from *:
    """
    #include <pthread.h>
    #include <unistd.h>
    /* This process's pid, kept (getpid is a system call) and read again in a forked child. */
    static int64_t zt_lease_pid;
    static void zt_lease_forked(void) { zt_lease_pid = getpid(); }
    static int zt_lease_pid_init(void) {
        zt_lease_pid = getpid();
        return pthread_atfork(NULL, NULL, zt_lease_forked);
    }
    """
    int64_t zt_lease_pid
    int zt_lease_pid_init()

LEASE_BUSY_OWNER = ZT_LEASE_BUSY_OWNER
LEASE_BUSY_TURN = ZT_LEASE_BUSY_TURN
if zt_lease_pid_init() != 0:
    raise OSError("pthread_atfork failed: forked children could not tell their own pid")


def current_pid():
    """This process's pid without a system call: kept, and read again in a forked child before
    any code runs there (the one kept pid: leases, host counters and Redis clients use it)."""
    return zt_lease_pid


cdef int _int8_col(Table table, object column, str user="a lease") except -1:
    """The index of INT(8) ``column`` (a lease's or a tally's), or ColumnTypeError."""
    cdef int ci = table._col(column)
    if table.cols[ci].type != ZT_INT or table.cols[ci].width != 8:
        raise ColumnTypeError(
            f"{user} lives in an INT(8) column; {column!r} of table {table.name!r} is not")
    return ci


cdef int _lease_tag(int64_t tag) except -1:
    if not 0 < tag <= ZT_LEASE_TAG_MASK:
        raise IntegerOverflowError(f"a lease's holder tag is 1 to {ZT_LEASE_TAG_MASK}, got {tag}")
    return 0


def lease_acquire(Table table, key, column, int64_t ms, int64_t tag, int64_t stale=0,
                  fence=None, turn=None, int64_t turn_ms=0, int64_t stale_turn=0):
    """Take the lease in INT(8) ``column`` of ``key`` for ``ms`` milliseconds as holder ``tag``
    (a pid), in one locked step; ``(fence, word)``.

    Free: the row holds 0, a word whose deadline has passed, or ``stale`` (a word whose holder
    the caller found dead).  Taken: ``word`` is the word written (deadline and tag) and
    ``fence`` the value of the ``fence`` column after adding one (a new row: the wall clock in
    µs, so fences keep rising after the table is made again); 0 without a ``fence`` column.
    Not taken:
    ``fence`` is ``LEASE_BUSY_OWNER`` with the holder's word, or, with a ``turn`` column,
    ``LEASE_BUSY_TURN`` with the live turn of another process that waits for the lease (not
    ``stale_turn``).  On ``LEASE_BUSY_OWNER`` with ``turn_ms`` > 0, this holder takes the turn
    for ``turn_ms``; taking the lease clears it.

    Raises:
        UnknownColumnError, ColumnTypeError: a column is missing or not INT(8).
        InvalidTTLError, IntegerOverflowError: ``ms`` is not positive, ``tag`` is outside 1 to
            2**22 - 1, or the fence column is at its limit (nothing written).
    """
    _lease_tag(tag)  # 0 is no holder here (LeaseColumns reads it as this process)
    return LeaseColumns(table, column, fence, turn, turn_ms).take(key, ms, tag, stale, stale_turn)


cdef class LeaseColumns:
    """The lease columns of one table, looked up once: :meth:`take` is :func:`lease_acquire`
    without finding and checking the columns on every call (the host locks take and give a
    lease per ``async with``), :meth:`give` its release.  A ``tag`` of 0 is this process's pid
    (kept, and read again in a forked child)."""

    cdef Table table
    cdef int oc, fc, tc
    cdef int64_t turn_ms
    cdef object fence

    def __cinit__(self, Table table, column, fence=None, turn=None, int64_t turn_ms=0):
        self.table = table
        self.oc = _int8_col(table, column)
        self.fc = -1 if fence is None else _int8_col(table, fence)
        self.tc = -1 if turn is None else _int8_col(table, turn)
        self.fence = fence
        self.turn_ms = turn_ms

    def take(self, key, int64_t ms, int64_t tag=0, int64_t stale=0, int64_t stale_turn=0):
        """:func:`lease_acquire` on these columns (with their ``turn_ms``): ``(fence, word)``."""
        cdef Py_ssize_t kn
        cdef int rc
        cdef int64_t word = 0, out = 0
        cdef Table table = self.table
        cdef const char *k = table._key(key, &kn)
        if ms <= 0:
            raise _errors.InvalidTTLError(f"a lease lasts at least 1 ms, got {ms}")
        if tag == 0:
            tag = zt_lease_pid
        _lease_tag(tag)
        rc = zt_lease_acquire(&table.t, k, <uint16_t>kn, table.cols, self.oc, ms, tag, stale,
                              self.fc, self.tc, self.turn_ms, stale_turn, &word, &out)
        if rc == ZT_EOVERFLOW:
            raise IntegerOverflowError(f"column {self.fence!r} of table {table.name!r} is at "
                                       f"its limit; lease {key!r} not taken")
        table._done(rc, key, "lease_acquire")
        return (out, word)

    def give(self, key, int64_t word, int64_t tag=0, bint delete=False):
        """Give up the lease ``word`` in ``key``'s row if holder ``tag`` wrote it and the row
        still holds it: set 0 (``delete``: remove the row), in one locked step; True when done.
        A forked child passes its own pid (the default), so it never releases its parent's
        lease."""
        cdef Py_ssize_t kn
        cdef zt_delta e, d
        cdef int swapped = 0, rc
        cdef Table table = self.table
        cdef const char *k = table._key(key, &kn)
        if tag == 0:
            tag = zt_lease_pid
        if word & ZT_LEASE_TAG_MASK != tag or word <= 0:
            return False
        e.col = d.col = self.oc
        e.i, d.i = word, 0
        if delete:
            rc = zt_remove(&table.t, k, <uint16_t>kn, 0, table.cols, &e)
            swapped = rc == 1
        else:
            rc = zt_cas(&table.t, k, <uint16_t>kn, table.cols, &e, &d, &swapped)
        table._done(rc, key, "lease_release")
        return swapped != 0

    def __reduce__(self):
        raise TypeError("lease columns are bound to a mapping of this process and cannot be "
                        "pickled")


# -- one field compared in place, a lock-free counter (appended: the cache's memory-tier hits) --

cdef extern from *:
    """
    /* Whether the live row of `key` holds exactly the n bytes `want` in BYTES/STRING column `c`:
     * 1 yes, 0 no (no such row, expired, another value), -1 cannot tell (a writer kept the row or
     * the index busy: ask zt_get), -2 `copy` (of `room` bytes) is too small for that.  zt_lookup
     * copies each candidate row only up to the end of `want` in the column (a cache row is
     * ~8 KiB, its value often ~50 bytes), and the field is compared in that private copy. */
    static int zt_field_equals(const zt_table *t, const char *key, uint16_t klen,
                               const zt_col *c, const char *want, uint32_t n, char *copy,
                               uint32_t room) {
        if (n > c->size || klen > t->g.key_limit) return 0;
        uint32_t need = c->offset + c->width + n;
        if (t->g.key_off + klen > need) need = t->g.key_off + klen;
        if (t->g.exp_off && t->g.exp_off + 8 > need) need = t->g.exp_off + 8;
        need = (need + 7) & ~7u;
        if (need > t->g.row_size) need = t->g.row_size;
        if (need > room) return -2;
        int busy;
        uint32_t busy_row;
        if (zt_lookup(t, key, klen, zt_hash(t->hkey, key, klen), copy, need, &busy, &busy_row) < 0)
            return busy ? -1 : 0;
        if (zt_expired(t, copy, zt_now(t))) return 0;
        return zt_get_slen(copy, c) == n && memcmp(zt_get_sptr(copy, c), want, n) == 0;
    }

    /* time.time(): the realtime clock in ns, as a double of seconds the way CPython converts it */
    static inline double zt_unix_now(void) {
        return (double)zt_now_ns(CLOCK_REALTIME) / 1e9;
    }

    static inline void zt_tally_add(int64_t *p, int64_t by) {
        __atomic_add_fetch(p, by, __ATOMIC_RELAXED);
    }
    """
    double zt_unix_now() nogil
    void zt_tally_add(int64_t *p, int64_t by) nogil
    int zt_field_equals(const zt_table *t, const char *key, uint16_t klen, const zt_col *c,
                        const char *want, uint32_t n, char *copy, uint32_t room) nogil


cdef class Tally:
    """One 8-byte INT column of one row, located once (the row created at 0 when missing), then
    added to with one lock-free atomic per :meth:`add`: a counter on a hot path.

    The rules of :class:`Cells` apply: the table has no ttl, and no process deletes the row (a
    freed row is reused for another key) nor writes that column through the table's methods
    while a tally on it may be used (e.g. a worker's own counter, keyed by its live pid).
    """

    cdef Table table
    cdef int64_t *p

    def __cinit__(self, Table table, key, column):
        cdef Py_ssize_t kn
        cdef char *row
        cdef int rc
        if table.t.g.exp_off != 0:
            raise ColumnTypeError(
                f"a tally needs rows that never expire; table {table.name!r} has a ttl")
        cdef int ci = _int8_col(table, column, "a tally")
        cdef const char *k = table._key(key, &kn)
        rc = zt_row_ref(&table.t, k, <uint16_t>kn, table.cols, &row)
        if rc != 0:
            table._fail(rc, key, "tally")
        self.table = table
        self.p = <int64_t *>(row + table.cols[ci].offset)

    def add(self, int64_t by=1):
        """Add ``by`` (atomically, across processes)."""
        if self.table._map.base == NULL:
            raise ShmError(f"table {self.table.name!r} of this tally is closed in this process")
        zt_tally_add(self.p, by)

    def __reduce__(self):
        raise TypeError("a tally is bound to a mapping of this process and cannot be pickled")


cdef class FieldMemo:
    """What this process derived from one BYTES field of one row, handed out while the row still
    holds those very bytes: ``get(miss)`` returns ``make()`` when the row of ``key`` holds exactly
    ``want`` in ``column`` (checked in place, copying only the row's head and that much of the column) and ``until`` (a
    ``time.time()`` instant; 0: none) has not come, adding 1 to ``tally`` (if any); else ``miss``.
    """

    cdef Table table
    cdef bytes key
    cdef bytes want
    cdef int ci
    cdef double until
    cdef object make
    cdef Tally tally

    def __cinit__(self, Table table, key, column, bytes want, double until, make,
                  Tally tally=None):
        cdef Py_ssize_t kn
        cdef const char *k = table._key(key, &kn)
        self.ci = table._col(column)
        if table.cols[self.ci].type != ZT_BYTES:
            raise ColumnTypeError(f"column {column!r} of table {table.name!r} is not BYTES")
        self.table = table
        self.key = PyBytes_FromStringAndSize(k, kn)
        self.want = want
        self.until = until
        self.make = make
        self.tally = tally

    cdef inline int _equals(self, char *buf, uint32_t room):
        return zt_field_equals(&self.table.t, PyBytes_AS_STRING(self.key),
                               <uint16_t>PyBytes_GET_SIZE(self.key), &self.table.cols[self.ci],
                               PyBytes_AS_STRING(self.want), <uint32_t>PyBytes_GET_SIZE(self.want),
                               buf, room)

    def get(self, miss):
        """``make()`` while the row holds ``want`` (counted in ``tally``), else ``miss``."""
        cdef uint64_t stackbuf[STACK_ROW_WORDS]
        cdef char *buf
        cdef int rc
        if self.table.t.hdr == NULL:
            self.table._check_open()
        if self.until != 0.0 and self.until <= zt_unix_now():
            return miss
        rc = self._equals(<char *>stackbuf, STACK_ROW_WORDS * 8)
        if rc == -2:  # a long value: its part of the row does not fit on the stack
            buf = self.table._buffer(NULL)
            try:
                rc = self._equals(buf, self.table.t.g.row_size)
            finally:
                free(buf)
        if rc != 1:
            return miss
        if self.tally is not None:
            if self.tally.table._map.base == NULL:
                return miss  # (the counters were closed: the full path decides)
            zt_tally_add(self.tally.p, 1)
        return self.make()
