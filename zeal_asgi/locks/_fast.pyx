# cython: language_level=3, boundscheck=False, wraparound=False
# cython: autotestdict=False, embedsignature=False, auto_pickle=False
"""The uncontended path of a lock, compiled: taking a free lock and giving it back.

:mod:`zeal_asgi.locks.lock` keeps the waiting, the queue of a process's coroutines and the
renewal in Python; this module holds what every block runs through: the lease object, the
per-process owner entry, the running task (kept in the task's context: on Python 3.11,
``asyncio.current_task()`` makes a ``getpid`` system call), and an ``async with`` whose enter
and exit finish without suspending when the scope grants at once.  It calls the scope's own
attempts and the locker's Python methods for everything else; nothing here decides policy.
"""

import asyncio
import os
import weakref
from contextvars import ContextVar

from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport PyObject

from zeal_asgi.errors import LockLostError, LockTimeoutError, ZealError

YEAR = 365 * 86400
"""The longest ttl or timeout, in seconds."""

cdef object _current_task = asyncio.current_task
cdef object _get_running_loop = asyncio.get_running_loop
cdef object _weakref = weakref.ref
cdef object _CancelledError = asyncio.CancelledError
# (loop, weak reference to the task, thread) of the task that last took a lock, kept in the
# task's context.  Tasks a task starts copy its context, so the task kept counts only while its
# coroutine runs in this thread: it is then the task running this code.
cdef object _here = ContextVar("zeal_asgi.locks.here")


def _forked():
    global _here
    _here = ContextVar("zeal_asgi.locks.here")  # a forked child runs no task of its parent


os.register_at_fork(after_in_child=_forked)


cdef tuple _look_up():
    """``(event loop, task)`` of the running coroutine (``task`` None outside a task), kept."""
    task = _current_task()
    if task is None:
        return _get_running_loop(), None
    loop = task.get_loop()
    _here.set((loop, _weakref(task), PyThread_get_thread_ident()))
    return loop, task


cdef tuple _running():
    """:func:`_look_up`, from the task's context when it is the one running."""
    here = _here.get(None)
    if here is not None:
        task = (<tuple>here)[1]()
        if task is not None and (<tuple>here)[2] == PyThread_get_thread_ident():
            try:
                if task.get_coro().cr_running:
                    return (<tuple>here)[0], task
            except AttributeError:  # the task of a coroutine that is not a native one
                pass
    return _look_up()


# An awaitable that is already done: awaiting it gives its value without suspending.  Its
# iterator slot is set to a C function below (raising StopIteration from Cython code would
# build a traceback on every block).
cdef extern from *:
    """
    static void zl_set_iternext(PyObject *type, void *fn) {
        ((PyTypeObject *)type)->tp_iternext = (iternextfunc)fn;
        PyType_Modified((PyTypeObject *)type);
    }
    """
    void zl_set_iternext(object type, void *fn)

cdef extern from "Python.h":
    void PyErr_SetObject(object type, object value)


cdef class _Ready:
    cdef object value

    def __await__(self):
        return self

    def __next__(self):
        raise StopIteration(self.value)


cdef PyObject *_ready_next(object self) noexcept:
    value = (<_Ready>self).value
    if value is not None:  # else: exhausted without an exception, the await gives None
        PyErr_SetObject(StopIteration, value)
    return NULL


zl_set_iternext(_Ready, <void *>_ready_next)
cdef _Ready _NONE = _Ready()


cdef class LockLease:
    """A held lock.  ``token`` is its fencing token: strictly greater than the token of every
    earlier holder of ``name`` in its scope, so a resource that remembers the highest token it
    has seen can refuse a holder that lost the lock without knowing it."""

    cdef readonly str name
    cdef readonly object token
    cdef readonly double ttl
    cdef public bint lost  # once the lease could not be renewed: another may hold the lock
    cdef public tuple _key  # (event loop, scope, name)
    cdef public object _handle, _task, _renewal  # _task: cancelled when the lease is lost
    cdef public double _renew_at  # valid until two thirds of the ttl later
    cdef public int _cancelling

    @property
    def scope(self):
        """``"host"`` or ``"cluster"``."""
        return self._key[1].name

    def __repr__(self):
        state = "lost" if self.lost else "held"
        return f"<LockLease {self.name!r} scope={self.scope} token={self.token} {state}>"


cdef class LockerBase:
    """The owners of this process's locks, and taking and giving back a lock without a
    coroutine; :class:`zeal_asgi.locks.lock.Locker` adds the waiting and the renewal."""

    cdef public dict _owners  # (loop, scope, name) -> the lease held, or None while polled for
    cdef public dict _waiters  # the coroutines waiting behind the owner, in order
    cdef public dict _timers  # loop -> (when, timer)

    def start(self, scope, str name, double ttl, wait, *, bint cancel=True):
        """``Locker.acquire`` without a coroutine when it need not wait: the lease when nobody
        of this process wants ``name`` and an immediate scope grants it at once, else the
        coroutine that waits for it (to be awaited at once)."""
        return self._start(scope, name, ttl, wait, cancel)

    cdef object _start(self, scope, str name, double ttl, wait, bint cancel):
        loop, task = _running()
        key = (loop, scope, name)
        ms = <long long>(ttl * 1000 + 0.5) or 1
        holder = task if cancel else None
        if key in self._owners:
            return self._wait(key, ttl, ms, wait, holder, queued=True)
        now = scope.immediate
        if now is not None:
            try:
                grant = now.take(name, ms)
            except ZealError:  # the scope's own attempt (in _wait) says why
                grant = None
            if grant is not None and grant[0] > 0:
                return self._grant(key, ttl, grant, holder)
        self._owners[key] = None  # ours to poll for: nobody else of this process wants it
        return self._wait(key, ttl, ms, wait, holder, queued=False)

    def _hold(self, tuple key, double ttl, grant, task):
        """The lease of ``grant``, renewed by its event loop's timer from now on."""
        return self._grant(key, ttl, grant, task)

    cdef LockLease _grant(self, tuple key, double ttl, grant, task):
        cdef LockLease lease = LockLease.__new__(LockLease)
        loop = key[0]
        lease._key, lease.name = key, key[2]
        lease.token, lease._handle = grant[0], grant[1]
        lease.ttl = ttl
        lease._task = task
        lease._cancelling = task.cancelling() if task is not None else 0
        lease._renew_at = loop.time() + ttl / 3
        self._owners[key] = lease
        timer = self._timers.get(loop)
        if timer is None or lease._renew_at < timer[0]:  # else that timer wakes before it's due
            self._arm(loop, lease._renew_at)
        return lease

    def _next(self, key):
        """The owner of ``key`` is done: the next waiting coroutine of this process goes on."""
        self._done(key)

    cdef int _done(self, key) except -1:
        self._owners.pop(key, None)
        if self._waiters:
            self._hand_on(key)
        return 0

    def release_now(self, LockLease lease, scope):
        """``Locker.release`` on a scope that never waits."""
        self._give(lease, scope)

    cdef int _give(self, LockLease lease, scope) except -1:
        if lease._renewal is not None:
            lease._renewal.cancel()
        try:
            if not lease.lost:
                scope.give(lease.name, lease._handle)
        finally:
            self._done(lease._key)
        return 0


cdef class LockContext:
    """``async with zeal.lock(...) as lease``: the :class:`LockLease` inside the block."""

    cdef LockerBase _locker
    cdef object _resolve, _scope, _timeout
    cdef str _name
    cdef double _ttl
    cdef LockLease _lease

    def __init__(self, LockerBase locker, resolve, scope, str name, double ttl, timeout):
        """``scope``: the scope, or its name for ``resolve`` to find when the block starts (the
        store's backend is known by then)."""
        self._locker, self._resolve, self._scope = locker, resolve, scope
        self._name, self._ttl, self._timeout = name, ttl, timeout

    def __aenter__(self):
        scope = self._scope if self._resolve is None else self._resolve(self._scope)
        got = self._locker._start(scope, self._name, self._ttl, self._timeout, True)
        if type(got) is not LockLease:
            return self._enter(scope, got)
        self._lease = got
        cdef _Ready ready = _Ready.__new__(_Ready)
        ready.value = got
        return ready

    async def _enter(self, scope, got):
        lease = await got
        if lease is None:
            raise LockTimeoutError(
                f"zeal.lock({self._name!r}, scope={scope.name!r}) not obtained within "
                f"{self._timeout:g} s"
            )
        self._lease = lease
        return lease

    def __aexit__(self, exc_type, exc, tb):
        lease, self._lease = self._lease, None
        if lease is None:
            return _NONE
        now = lease._key[1].immediate
        if now is None:
            return self._exit(lease, exc_type, exc)
        self._locker._give(lease, now)  # no await: nothing to wait for
        if lease.lost:
            self._lost(lease, exc_type, exc)
        return _NONE

    async def _exit(self, LockLease lease, exc_type, exc):
        await self._locker.release(lease)
        if lease.lost:
            self._lost(lease, exc_type, exc)

    cdef int _lost(self, LockLease lease, exc_type, exc) except -1:
        task = lease._task  # cancelled by the loss (it held the lease, so it was not done)
        if task is not None and task.uncancel() > lease._cancelling:
            return 0  # cancelled from outside as well: that cancellation goes on
        if exc_type is None or issubclass(exc_type, _CancelledError):
            raise LockLostError(
                f"zeal.lock({lease.name!r}, scope={lease.scope!r}) lost its lease while the "
                "block ran (not renewed in time): the block was cancelled"
            ) from exc
        return 0


cdef class LocksBase:
    """``lock()`` of :class:`zeal_asgi.locks.Locks`: a host lock on a name seen before with a
    plain ttl and no timeout is made here; any other call goes to the class's ``_lock``."""

    cdef public LockerBase locker
    cdef public object host
    cdef public set _names  # the names checked already

    def lock(self, name, ttl, scope="host", timeout=None):
        """``async with locks.lock(name, ttl) as lease``: see :meth:`zeal_asgi.Zeal.lock`."""
        cdef LockContext context
        if (
            timeout is None
            and type(name) is str
            and (type(ttl) is float or type(ttl) is int)
            and scope == "host"
            and name in self._names
            and 0 < ttl <= YEAR
        ):
            context = LockContext.__new__(LockContext)
            context._locker, context._scope = self.locker, self.host
            context._name, context._ttl = name, ttl
            return context
        return self._lock(name, ttl, scope, timeout)
