"""``Store``: one async API over every backend, class-level (seed style) or per app.

``Store.get(...)`` on the class acts on the process-wide default store; ``store.get(...)`` on an
instance (``Depends(get_store)``) acts on that instance.  Both are the same methods.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import MethodType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    cast,
)

from zeal_asgi.errors import ConfigError, UnknownTableError, require
from zeal_asgi.settings import ZealSettings
from zeal_asgi.shm.schema import ColumnType, Schema
from zeal_asgi.store.base import (
    Capability,
    CounterBackend,
    Key,
    Row,
    StoreBackend,
    StoreBackendKind,
    TableSpec,
    unsupported,
)
from zeal_asgi.store.channels import as_bytes, validate_channel
from zeal_asgi.store.codec import INT64_MAX, INT64_MIN, check_step
from zeal_asgi.store.models import columns_from_model, model_of, row_of

if TYPE_CHECKING:
    from pydantic import BaseModel

    from zeal_asgi.shm import Table
    from zeal_asgi.store.counter import Counter

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound="BaseModel")


class _HasDefault(Protocol):
    @classmethod
    def default(cls) -> Any: ...


S = TypeVar("S", bound=_HasDefault)


class hybridmethod(Generic[S, P, R]):
    """A method usable on the class (acting on ``Owner.default()``) and on an instance.

    Shared by ``Store`` and ``Cache`` (classes made by :class:`HybridMeta`, with a ``default()``
    classmethod and a ``_default`` class attribute).  Until a default exists, a class-level
    lookup builds it through ``default()``; from then on it is a plain class attribute.
    """

    def __init__(self, fn: Callable[Concatenate[S, P], R]) -> None:
        self.fn = fn
        functools.update_wrapper(cast(Any, self), fn)  # fn's name and docstring, for help()

    def __get__(self, obj: S | None, owner: type[S]) -> Callable[P, R]:
        if obj is None:  # no default yet: default() makes one, which installs its methods
            bound: Callable[P, R] = getattr(owner.default(), self.fn.__name__)
            return bound
        return MethodType(self.fn, obj)

    def __set_name__(self, owner: type, name: str) -> None:
        hybrids = vars(owner).get("_hybrid_methods")
        if hybrids is None:  # its bases' first: once a default exists, theirs are bound methods
            hybrids = {**getattr(owner, "_hybrid_methods", {})}
            type.__setattr__(owner, "_hybrid_methods", hybrids)
        hybrids[name] = self


class HybridMeta(type):
    """Makes class-level calls of :class:`hybridmethod` cost a class attribute lookup.

    A descriptor's ``__get__`` runs Python code on every ``Store.get`` (more than the table
    backend's whole ``get``).  Instead, whenever ``_default`` is assigned, the default's bound
    methods become attributes of the class (and the descriptors come back when it is ``None``);
    each instance holds its own bound methods in its ``__dict__``, which instance lookups find
    first, so ``store.get`` is still that store's.
    """

    _hybrid_methods: dict[str, hybridmethod[Any, Any, Any]] = {}
    """The hybrid methods of a class by name, its bases' included (``hybridmethod.__set_name__``
    fills it): the descriptors, whatever the class holds now."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj: Any = cast(Any, cls).__new__(cls)
        for name, fn in cls._hybrid_methods.items():  # before __init__, which may call them
            obj.__dict__[name] = MethodType(fn.fn, obj)
        obj.__init__(*args, **kwargs)
        return obj

    def __setattr__(cls, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "_default":
            for attr, fn in cls._hybrid_methods.items():
                bound = None if value is None else MethodType(fn.fn, value)
                super().__setattr__(attr, value.__dict__.setdefault(attr, bound) if bound else fn)


_STATS_SECTIONS: dict[Callable[[], Mapping[str, Any]], None] = {}  # in order, each once


def add_stats_section(section: Callable[[], Mapping[str, Any]]) -> None:
    """Add the counters of a layer built on the Store (messaging) to every ``Store.stats()``.

    The Store never imports what is built on it; those layers register here instead.
    """
    _STATS_SECTIONS[section] = None


# kind -> (module under zeal_asgi.store.backends, class, (the client library it needs, its extra))
_BUILDERS: dict[StoreBackendKind, tuple[str, str, tuple[str, str] | None]] = {
    StoreBackendKind.TABLE: ("table", "TableBackend", None),
    StoreBackendKind.REDIS: ("redis", "RedisBackend", ("redis", "redis")),
    StoreBackendKind.TIERED: ("tiered", "TieredBackend", ("redis", "redis")),
    StoreBackendKind.MEMCACHED: ("memcached", "MemcachedBackend", ("aiomcache", "memcached")),
}


def build_backend(
    kind: StoreBackendKind | str, conn: str | Mapping[str, Any] | None = None
) -> StoreBackend:
    """Build (and validate, without any I/O) the backend for ``kind`` and ``conn``.

    ``conn`` is a URL / server list or an options dict; ``None`` reads the ``ZEAL_*`` environment.
    ``on_error="fallback_table"`` wraps the backend in the circuit breaker.
    """
    k = StoreBackendKind.parse(kind)
    module, cls_name, needs = _BUILDERS[k]
    if needs is not None:
        require(needs[0], extra=needs[1], feature=f"the {k.value} Store backend")
    cls = getattr(importlib.import_module(f"zeal_asgi.store.backends.{module}"), cls_name)
    backend: StoreBackend = cls.from_config(conn)
    if isinstance(conn, Mapping) and conn.get("on_error") is not None:
        if conn["on_error"] != "fallback_table":
            raise ConfigError(
                f"on_error must be 'fallback_table' or None, got {conn['on_error']!r}"
            )
        if k is not StoreBackendKind.TABLE:
            breaker = importlib.import_module("zeal_asgi.store.backends.breaker")
            backend = breaker.CircuitBreakerBackend.wrap(backend, conn.get("breaker"))
    return backend


class Store(metaclass=HybridMeta):
    """Shared rows and counters over the configured backend.

    Example::

        Store.make("demo_table", 128, {"name": (Store.TYPE_STRING, 64), "n": (Store.TYPE_INT, 4)})

        @app.get("/hit")
        async def hit():
            await Store.set("demo_table", "user_1", {"name": "alice", "score": 100})
            return await Store.get("demo_table", "user_1")
    """

    TYPE_INT: ClassVar[ColumnType] = ColumnType.INT
    TYPE_FLOAT: ClassVar[ColumnType] = ColumnType.FLOAT
    TYPE_STRING: ClassVar[ColumnType] = ColumnType.STRING
    TYPE_BYTES: ClassVar[ColumnType] = ColumnType.BYTES
    BACKEND_TABLE: ClassVar[StoreBackendKind] = StoreBackendKind.TABLE
    BACKEND_REDIS: ClassVar[StoreBackendKind] = StoreBackendKind.REDIS
    BACKEND_TIERED: ClassVar[StoreBackendKind] = StoreBackendKind.TIERED
    BACKEND_MEMCACHED: ClassVar[StoreBackendKind] = StoreBackendKind.MEMCACHED

    _default: ClassVar[Store | None] = None

    def __init__(
        self,
        kind: StoreBackendKind | str | None = None,
        conn: str | Mapping[str, Any] | None = None,
        *,
        backend: StoreBackend | None = None,
    ) -> None:
        self._specs: dict[str, TableSpec] = {}
        self._counters: dict[str, Counter] = {}
        self._shm: dict[str, Table] = {}  # fast path: tracked tables on the table backend
        if backend is None:
            if kind is None:
                settings = ZealSettings.from_env()
                kind, conn = settings.store_backend, settings.backend_conn()
            backend = build_backend(kind, conn)
        self._backend: StoreBackend = backend

    # -- the default instance ------------------------------------------------------------------

    @classmethod
    def default(cls) -> Store:
        """The process-wide store used by the class-level calls (built from ``ZEAL_*`` env)."""
        store = cls._default
        if store is None:
            store = cls._default = cls()
        return store

    @classmethod
    def set_default(cls, store: Store | None) -> None:
        """Replace (or drop, with ``None``) the process-wide default store."""
        cls._default = store

    # -- configuration -------------------------------------------------------------------------

    @property
    def backend(self) -> StoreBackend:
        """The backend serving this store."""
        return self._backend

    @property
    def kind(self) -> StoreBackendKind:
        """Kind of the backend serving this store."""
        return self._backend.kind

    @hybridmethod
    def default_backend(
        self,
        kind: StoreBackendKind | str | None = None,
        conn: str | Mapping[str, Any] | None = None,
    ) -> StoreBackendKind:
        """Get the backend kind, or switch backend: ``default_backend("redis", "redis://h:6379")``.

        The setter validates at once (a bad URL raises ConfigError) and opens no connection;
        tables and counters declared so far are declared again on the new backend.
        """
        if kind is not None:
            self.use_backend(build_backend(kind, conn))
        elif conn is not None:
            raise ConfigError("default_backend(conn=...) needs a kind")
        return self._backend.kind

    def use_backend(self, backend: StoreBackend) -> None:
        """Serve this store from ``backend`` (a ready instance), re-declaring tables/counters."""
        self._backend = backend
        self._shm = {}
        for spec in self._specs.values():
            self._declare(spec)
        for counter in list(self._counters.values()):
            counter.rebind()

    def _declare(self, spec: TableSpec) -> Table | None:
        table = self._backend.declare(spec)
        # the fast path skips the backend: only for tables whose rows need no more checks
        plain = spec.mode == "tracked" and spec.model is None
        if table is not None and plain and self._backend.kind is StoreBackendKind.TABLE:
            self._shm[spec.name] = table
        else:
            self._shm.pop(spec.name, None)
        return table

    @hybridmethod
    def make(
        self,
        name: str,
        max_rows: int = 1024,
        columns: Mapping[str, Any] | None = None,
        *,
        mode: str = "tracked",
        ttl: int | None = None,
        model: type[BaseModel] | None = None,
        key_size: int = 64,
        allow_nan: bool = False,
        binary_keys: bool = False,
    ) -> Table | None:
        """Declare a table; returns the shared ``Table`` on the table backend, else ``None``.

        Call it at import time (or in the master), before workers start.  ``columns`` maps names
        to ``(Store.TYPE_INT, 4)``, ``(Store.TYPE_FLOAT,)``, ``(Store.TYPE_STRING, 64)``; or pass
        a pydantic ``model`` to derive them.  ``mode="ttl"`` with ``ttl>=1`` expires rows;
        ``mode="tracked"`` (default) keeps an O(1) count and refuses a ttl.
        """
        if not isinstance(name, str) or not name or ":" in name or len(name) > 128:
            raise ConfigError(f"table name must be a non-empty str without ':', got {name!r}")
        if mode not in ("tracked", "ttl"):
            raise ConfigError(f"table {name!r}: mode must be 'tracked' or 'ttl', got {mode!r}")
        if mode == "tracked" and ttl is not None:
            raise ConfigError(
                f"table {name!r}: a tracked table keeps an exact count and cannot expire rows; "
                "use mode='ttl' for a ttl"
            )
        if mode == "ttl" and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 1):
            raise ConfigError(f"table {name!r}: mode='ttl' needs ttl >= 1 (seconds), got {ttl!r}")
        if model is not None:
            if columns is not None:
                raise ConfigError(f"table {name!r}: pass columns or model, not both")
            columns = columns_from_model(model)
        if columns is None:
            columns = {"value": (ColumnType.STRING, 256)}
        schema = Schema.declare(
            columns, key_size=key_size, allow_nan=allow_nan, binary_keys=binary_keys
        )
        schema.geometry(max_rows)  # validates max_rows now, whatever the backend
        spec = TableSpec(name, max_rows, schema, mode, ttl, model)
        old = self._specs.get(name)
        if old is not None and old != spec:
            diff = old.schema.difference(schema) or (
                f"max_rows, mode, ttl: {old.max_rows}, {old.mode}, {old.ttl} vs {max_rows}, "
                f"{mode}, {ttl}"
            )
            raise ConfigError(
                f"table {name!r} was already made with another schema (before vs now: {diff})"
            )
        self._specs[name] = spec
        return self._declare(spec)

    def spec(self, table: str) -> TableSpec:
        """The declaration of ``table``."""
        try:
            return self._specs[table]
        except KeyError:
            raise UnknownTableError(
                f"table {table!r} was never made; declare it with Store.make() at import time"
            ) from None

    @hybridmethod
    def names(self) -> list[str]:
        """Names of the declared tables."""
        return list(self._specs)

    @hybridmethod
    def counters(self) -> dict[str, Any]:
        """The named counters declared on this store (``Counter(..., name=...)``), by name."""
        return dict(self._counters)

    @hybridmethod
    def table(self, name: str) -> Table:
        """The raw shared ``Table`` (table backend only)."""
        t = self._shm.get(name)
        return t if t is not None else self._backend.table(self.spec(name).name)

    # -- rows ----------------------------------------------------------------------------------

    @hybridmethod
    async def set(self, table: str, key: Key, row: Mapping[str, Any] | BaseModel) -> bool:
        """Merge ``row`` (a dict or a pydantic model) into the row at ``key``; ``True``.

        On a table made from a model, a dict must also keep within the model's limits.
        """
        t = self._shm.get(table)
        if t is not None and isinstance(row, Mapping):
            return t.set(key, row)
        spec = self.spec(table)
        return await self._backend.set(spec, key, row_of(spec, row))

    @hybridmethod
    async def get(self, table: str, key: Key, field: str | None = None) -> Any:
        """The row (dict) or one field; **``False`` on a miss** (the seed's contract).

        Prefer :meth:`get_strict`, which returns ``None`` on a miss.
        """
        t = self._shm.get(table)
        if t is not None:
            v = t.get(key, field)
        else:
            v = await self._backend.get(self.spec(table), key, field)
        return False if v is None else v

    @hybridmethod
    async def get_strict(self, table: str, key: Key, field: str | None = None) -> Any:
        """The row (dict) or one field; ``None`` on a miss."""
        t = self._shm.get(table)
        if t is not None:
            return t.get(key, field)
        return await self._backend.get(self.spec(table), key, field)

    @hybridmethod
    async def get_model(self, table: str, key: Key) -> Any:
        """The row as the table's pydantic model, or ``None`` on a miss."""
        spec = self.spec(table)
        if spec.model is None:
            raise ConfigError(f"table {table!r} was not made with a model")
        row = await self.get_strict(table, key)
        return None if row is None else model_of(spec, key, row)

    @hybridmethod
    async def delete(self, table: str, key: Key) -> bool:
        """Remove the row; ``True`` if it existed."""
        t = self._shm.get(table)
        if t is not None:
            return t.delete(key)
        return await self._backend.delete(self.spec(table), key)

    @hybridmethod
    async def exists(self, table: str, key: Key) -> bool:
        """``True`` when the row exists."""
        t = self._shm.get(table)
        if t is not None:
            return t.exists(key)
        return await self._backend.exists(self.spec(table), key)

    @hybridmethod
    async def exists_cached(self, table: str, key: Key) -> bool:
        """``True`` when this host's memory holds the row (no network): the tiered backend's
        fresh L1 copy, or the shared table itself; always ``False`` on redis and memcached."""
        return await self._backend.exists_cached(self.spec(table), key)

    @hybridmethod
    async def incr(self, table: str, key: Key, column: str, by: int | float = 1) -> int | float:
        """Atomically add ``by`` to a numeric column (creating the row); the new value."""
        t = self._shm.get(table)
        if t is not None and (type(by) is not int or INT64_MIN <= by <= INT64_MAX):
            result: int | float = t.incr(key, column, by)  # the shared table checks the rest
            return result
        spec = self.spec(table)
        spec.check_key(key)  # the table's order: key, column, step
        step = check_step(spec.schema.column(column, table), by, table, spec.schema.allow_nan)
        return await self._backend.incr(spec, key, column, step)

    @hybridmethod
    async def decr(self, table: str, key: Key, column: str, by: int | float = 1) -> int | float:
        """Atomically subtract ``by``; the new value."""
        if isinstance(by, bool) or not isinstance(by, (int, float)):
            return await self.incr(table, key, column, by)  # raises the typed error
        return await self.incr(table, key, column, -by)

    @hybridmethod
    async def compare_and_set(
        self, table: str, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected``."""
        return await self._backend.compare_and_set(self.spec(table), key, column, expected, new)

    @hybridmethod
    async def count(self, table: str) -> int:
        """Number of rows (O(1) on tracked tables)."""
        spec = self.spec(table)
        return await self._capable(Capability.LISTING, f"Store.count({table!r})").count(spec)

    @hybridmethod
    def iterate(self, table: str) -> AsyncIterator[tuple[Any, Row]]:
        """``async for key, row in Store.iterate("t")`` over every row."""
        spec = self.spec(table)
        return self._capable(Capability.LISTING, f"Store.iterate({table!r})").iterate(spec)

    @hybridmethod
    async def mget(self, table: str, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order (``None`` for misses); one round trip on Redis."""
        return await self._backend.mget(self.spec(table), list(keys))

    @hybridmethod
    async def mset(self, table: str, rows: Mapping[Any, Mapping[str, Any]]) -> int:
        """Write many rows (all validated first); one round trip on Redis."""
        spec = self.spec(table)
        return await self._backend.mset(spec, {k: row_of(spec, r) for k, r in rows.items()})

    @hybridmethod
    async def clear(self, table: str) -> int:
        """Remove every row of ``table``; the number removed."""
        spec = self.spec(table)
        return await self._capable(Capability.LISTING, f"Store.clear({table!r})").clear(spec)

    # -- messaging and scripting -----------------------------------------------------------------

    def _capable(self, needs: Capability, what: str) -> StoreBackend:
        backend = self._backend
        if needs not in backend.capabilities:
            raise unsupported(backend, what, needs)
        return backend

    @hybridmethod
    async def publish(self, channel: str, payload: str | bytes) -> int:
        """Publish to every subscribed worker on every node; the number of receivers.

        The channel (a str of at most 256 UTF-8 bytes) and the payload (``str``, ``bytes`` or
        ``bytearray``) follow one rule on every backend (:mod:`zeal_asgi.store.channels`).
        """
        channel, data = validate_channel(channel), as_bytes(payload)
        return await self._capable(Capability.PUBSUB, "Store.publish").publish(channel, data)

    @hybridmethod
    async def publish_reliable(
        self, stream: str, payload: str | bytes, max_len: int | None = None
    ) -> str:
        """Append to a Redis Stream (at-least-once consumers); the entry id."""
        stream, data = validate_channel(stream, "stream"), as_bytes(payload)
        backend = self._capable(Capability.STREAMS, "Store.publish_reliable")
        return await backend.publish_reliable(stream, data, max_len)

    @hybridmethod
    async def eval(self, script: str, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        """Run a Lua script server-side (redis and tiered backends)."""
        backend = self._capable(Capability.EVAL, "Store.eval")
        return await backend.eval(script, list(keys), list(args))

    # -- health --------------------------------------------------------------------------------

    @hybridmethod
    async def ping(self) -> bool:
        """``True`` when the backend answers."""
        return await self._backend.ping()

    @hybridmethod
    def stats(self) -> dict[str, Any]:
        """Backend counters: pool, pub/sub, breaker, tables."""
        out: dict[str, Any] = {"backend": str(self._backend.kind)}
        out.update(self._backend.stats())
        for section in _STATS_SECTIONS:
            out.update(section())
        return out

    @hybridmethod
    async def start(self) -> None:
        """Open the backend's connections in this worker (the lifespan calls it)."""
        await self._backend.start()

    @hybridmethod
    async def aclose(self) -> None:
        """Close this worker's connections."""
        await self._backend.aclose()

    # -- counters (zeal_asgi.Counter) -------------------------------------------------------------

    def declare_counter(self, counter: Counter) -> CounterBackend:
        """Register ``counter`` (it follows a backend switch) and return its backend counter."""
        self._counters[counter.name] = counter
        return self._backend.counter(counter.name, counter.initial)
