# cython: language_level=3, boundscheck=False, wraparound=False
# cython: autotestdict=False, embedsignature=False, auto_pickle=False
"""The common hit of a one-limit fixed-window limiter on the table backend, compiled, and the
``RateLimit`` header value every path of the package formats with.

:mod:`zeal_asgi.ratelimit.limiter` owns the configuration, the binding to a store's table and
every uncommon case; :class:`FixedWindow` decides an admitted hit of cost 1 with the table's one
atomic step and appends its headers in one call, and answers ``None`` (nothing charged, nothing
appended) whenever the limiter's Python path must decide instead.
"""

from libc.math cimport ceil
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

from zeal_asgi.errors import TableFullError

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    int CLOCK_REALTIME

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

# The result of an admitted hit, a NamedTuple filled in place: calling its class would parse
# seven arguments by name.
cdef extern from *:
    """
    static PyObject *zr_admitted(PyObject *type, PyObject *limit, long long remaining,
                                 double reset, PyObject *zero, PyObject *policy) {
        PyObject *r = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 7);
        PyObject *items[7];
        int i;
        if (r == NULL) return NULL;
        items[2] = PyLong_FromLongLong(remaining);
        items[3] = PyFloat_FromDouble(reset);
        if (items[2] == NULL || items[3] == NULL) {
            Py_XDECREF(items[2]);
            Py_XDECREF(items[3]);
            Py_DECREF(r);
            return NULL;
        }
        items[0] = Py_True, items[1] = limit, items[4] = zero;
        items[5] = policy, items[6] = Py_None;
        for (i = 0; i < 7; i++) {
            if (i != 2 && i != 3) Py_INCREF(items[i]);
            PyTuple_SET_ITEM(r, i, items[i]);
        }
        return r;
    }
    """
    object zr_admitted(object type, object limit, long long remaining, double reset, object zero,
                       object policy)


def policy_prefix(str name):
    """The start of a ``RateLimit`` header value for the policy ``name``: ``b'"name";r='``."""
    return b'"' + name.encode("ascii") + b'";r='


cdef Py_ssize_t _digits(char *end, unsigned long long n) noexcept:
    """Write ``n`` in decimal to end at ``end``; its length (printf would parse a format)."""
    cdef char *p = end
    while True:
        p -= 1
        p[0] = <char>(48 + n % 10)
        n //= 10
        if n == 0:
            return end - p


cdef bytes _value(bytes prefix, long long remaining, double reset):
    cdef char tail[48]  # "<remaining>;t=<reset>", written backwards from its end
    cdef char *end = tail + sizeof(tail)
    cdef Py_ssize_t n = _digits(end, <unsigned long long>ceil(reset) if reset > 0 else 0)
    n += 3
    memcpy(end - n, b";t=", 3)
    n += _digits(end - n, remaining if remaining > 0 else 0)
    cdef Py_ssize_t p = PyBytes_GET_SIZE(prefix)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, p + n)
    cdef char *buf = PyBytes_AS_STRING(out)
    memcpy(buf, PyBytes_AS_STRING(prefix), p)
    memcpy(buf + p, end - n, n)
    return out


def ratelimit_value(bytes prefix, long long remaining, double reset_after):
    """The ``RateLimit`` header value: ``prefix`` (:func:`policy_prefix`) then
    ``<remaining>;t=<seconds until the reset, rounded up>``, both at least 0."""
    return _value(prefix, remaining, reset_after)


def peer(scope):
    """The socket peer's address of an ASGI ``scope`` (``"unknown"`` without one), as a str."""
    return _peer(scope)


cdef str _peer(scope):
    client = (<dict>scope).get("client") if type(scope) is dict else scope.get("client")
    if not client:
        return "unknown"
    address = client[0]
    return address if type(address) is str else str(address)


cdef inline double _now() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)  # time.time()'s clock
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef class FixedWindow:
    """An admitted hit of cost 1 on a limiter with one fixed-window limit, decided on the
    shared table and formatted here.

    The row, its window's base (the window's index above the count's bits) and the bound are
    the limiter's (see ``RateLimiter._base``); ``arm`` binds the table of a store and its
    backend, and a hit on a store or backend other than the armed ones is the limiter's.
    """

    cdef object incr, limit, result, schedule, follow
    cdef str suffix, column
    cdef object table, store, backend
    cdef object o_base, o_bound  # the window's floor and bound, as the ints passed on
    cdef object o_amount, o_zero  # the result's limit and retry_after
    cdef tuple policy_item
    cdef bytes prefix
    cdef double per, start, end
    cdef long long amount, offset, base
    cdef int shift
    cdef Py_ssize_t key_size
    cdef long long allowed  # admitted hits since the last take()
    cdef public double due  # a hit after this schedules a flush of the counts (0: none pending)

    def __init__(self, incr_bounded, str suffix, str column, limit, long long offset, int shift,
                 Py_ssize_t key_size, bytes policy, bytes prefix, schedule, result, follow):
        """``incr_bounded``: the table's atomic bounded add, on the row of a key and ``suffix``
        and its INT ``column``; ``limit``: the one :class:`~zeal_asgi.ratelimit.RateLimit`;
        ``offset``: the index of the window holding the limiter's epoch; ``shift``: the count's
        bits; ``policy``: the ``RateLimit-Policy`` value; ``prefix``: :func:`policy_prefix` of
        the limit; ``schedule``: the call that flushes the counts (:meth:`take` among them) a
        little later and sets ``due``; ``result``: the result's class; ``follow``: the call
        giving the limiter's store when it follows the default one, else ``None``."""
        self.incr, self.limit, self.result, self.follow = incr_bounded, limit, result, follow
        self.suffix, self.column = suffix, column
        self.amount, self.per = limit.amount, limit.per
        self.o_amount, self.o_zero = limit.amount, 0.0
        self.offset, self.shift, self.key_size = offset, shift, key_size
        self.policy_item = (b"ratelimit-policy", policy)
        self.prefix, self.schedule = prefix, schedule
        self.start = self.end = 0.0
        self.due = 0.0

    def arm(self, table, store, backend):
        """Decide on ``table`` while the limiter's store is ``store`` on ``backend``
        (``table`` None: never, the store's backend is not the table's)."""
        self.table, self.store, self.backend = table, store, backend
        self.start = self.end = 0.0

    def take(self):
        """The admitted hits counted here since the last call."""
        n, self.allowed = self.allowed, 0
        return n

    def hit(self, key, list headers):
        """Charge 1 to ``key``: the result when admitted, with the ``RateLimit-Policy`` and
        ``RateLimit`` headers appended to ``headers``; ``None`` when the limiter must decide."""
        return self._hit(key, headers, _now())

    def hit_at(self, key, list headers, double now):
        """:meth:`hit` at the time ``now`` (seconds since the epoch)."""
        return self._hit(key, headers, now)

    def hit_peer(self, scope, list headers):
        """:meth:`hit` on the key :func:`peer` of ``scope``."""
        return self._hit(_peer(scope), headers, _now())

    cdef object _hit(self, key, list headers, double now):
        if (
            self.table is None
            or type(key) is not str
            or not 0 < len(<str>key) <= self.key_size
            or not PyUnicode_IS_ASCII(key)
        ):
            return None
        store = self.store if self.follow is None else self.follow()
        if store is not self.store or store.backend is not self.backend:
            return None
        cdef long long w
        if not self.start <= now < self.end:
            w = <long long>(now / self.per)
            self.start, self.end = <double>w * self.per, <double>(w + 1) * self.per
            self.base = (w - self.offset) << self.shift
            self.o_base, self.o_bound = self.base, self.base + self.amount
        try:
            value, ok = self.incr(
                self.table, key + self.suffix, self.column, 1, self.o_bound, self.o_base
            )
        except TableFullError:
            return None
        if not ok:  # refused (nothing charged): the limiter says so, with its headers
            return None
        cdef long long remaining = self.amount - (<long long>value - self.base)
        cdef double reset = self.end - now
        self.allowed += 1
        if now > self.due:
            self.schedule()
        headers.append(self.policy_item)
        headers.append((b"ratelimit", _value(self.prefix, remaining, reset)))
        return zr_admitted(self.result, self.o_amount, remaining, reset, self.o_zero, self.limit)
