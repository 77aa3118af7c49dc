"""Connection options of the Redis backend: parsed and validated up front, without any I/O.

``RedisConfig.parse(conn)`` accepts a URL, an options dict or ``None`` (then ``ZEAL_REDIS_URL``,
else ``redis://127.0.0.1:6379/0``).  Every knob the client library has a default for is set here
explicitly, because those defaults keep changing between releases.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal, Self, cast

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from zeal_asgi.errors import ConfigError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_SCHEMES = {"redis": False, "valkey": False, "rediss": True, "valkeys": True, "tls": True}
"""URL schemes and whether they mean TLS (``tls://`` is the seed's spelling of ``rediss://``)."""
_QUERY_OPTS = frozenset(
    "pool_size retries db socket_timeout connect_timeout acquire_timeout deadline "  # noqa: SIM905
    "health_check_interval ssl_ca_certs ssl_certfile ssl_keyfile ssl_cert_reqs "
    "ssl_check_hostname auto_pipeline".split()
)
"""Options a URL query string may set too (same names as the dict keys)."""
_OPTIONS = _QUERY_OPTS | {"prefix", "service", "username", "password", "sentinel_password", "tls"}
_TARGETS = ("url", "cluster", "sentinel", "client")
_FACADE_KEYS = {"on_error", "breaker"}
"""Read by the Store facade (circuit breaker), accepted and ignored here."""
Seconds = Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)]


class RedisConfig(BaseModel):
    """Validated options of one Redis backend (standalone, Cluster, Sentinel or a ready client).

    Dict keys (and URL query options, for the scalar ones) have the names of these fields;
    ``url``, ``cluster``, ``sentinel`` (+ ``service``) and ``client`` choose the target.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    mode: Literal["standalone", "cluster", "sentinel", "client"] = "standalone"
    """``client``: a ready redis.asyncio client."""
    host: str | None = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    """``unix:///path/to/redis.sock`` URLs."""
    db: int = Field(default=0, ge=0)
    username: str | None = None
    """ACL user (URL ``redis://user:password@host``, or the option for Cluster/Sentinel)."""
    password: str | None = Field(default=None, repr=False)
    tls: bool = False
    """``rediss://``; the ``tls`` option for Cluster and Sentinel (data nodes and sentinels)."""
    nodes: tuple[tuple[str, int], ...] = ()
    """Cluster startup nodes, or the sentinels."""
    service: str | None = Field(default=None, min_length=1)
    """The master's name, with ``sentinel``."""
    sentinel_password: str | None = Field(default=None, repr=False)
    client: Any = None
    pool_size: int = Field(default=64, ge=1, le=1024)
    """Calls in flight at once per worker and event loop (the slots; pipelined single commands
    cost no connection each); also the most connections the pooled client opens for pipelines,
    scans and Streams consumers."""
    auto_pipeline: bool = True
    """Single commands issued together are written together (one write per pass of the event
    loop); ``False``: each one is written on its own.  Either way they share one connection per
    server (Cluster: per node)."""
    prefix: str = Field(default="zeal", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """First part of every key and channel (no braces or colons: they shape Redis Cluster hash
    tags and key separators)."""
    socket_timeout: Seconds = 1.0
    """Seconds to wait for one reply."""
    connect_timeout: Seconds = 1.0
    """Seconds to open a connection (TCP and TLS)."""
    acquire_timeout: Seconds = 0.5
    """Seconds to wait for a free slot before PoolTimeoutError.  Short enough to shed load
    instead of queueing without bound, long enough that a busy worker (its ``pool_size`` calls in
    flight, its event loop saturated) does not fail requests that a healthy Redis would serve a
    few milliseconds later."""
    health_check_interval: float = Field(default=15.0, ge=0, le=86400, allow_inf_nan=False)
    """An idle connection is PINGed before reuse after this many seconds (0: never)."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts of an idempotent command after a connection error or timeout."""
    deadline: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)
    """Upper bound of one call (slot, connect, command, retries, backoff); 0: the default,
    ``acquire_timeout + socket_timeout``."""
    ssl_ca_certs: str | None = None
    """CA bundle that signs the server certificate (default: the system's)."""
    ssl_certfile: str | None = None
    """Client certificate (mutual TLS), with ``ssl_keyfile``."""
    ssl_keyfile: str | None = None
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """``required`` (default); ``optional``/``none`` weaken TLS and log a warning every start."""
    ssl_check_hostname: bool = True
    """Check the certificate names the host; ``False`` logs a warning every start."""

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if not self.tls and (self.ssl_ca_certs or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError("ssl_* options need TLS: use a rediss:// URL (or tls=True)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile go together (client certificate)")
        if self.mode == "cluster" and self.db:
            raise ValueError("a Redis Cluster has only db 0")
        if self.deadline == 0.0:
            # A call may wait for a slot, then for the command: nothing longer, whatever retries.
            object.__setattr__(self, "deadline", self.acquire_timeout + self.socket_timeout)
        return self

    # -- derived -------------------------------------------------------------------------------

    @property
    def verification_weakened(self) -> bool:
        """True when TLS is on but the certificate or the host name is not verified."""
        return self.tls and (self.ssl_cert_reqs != "required" or not self.ssl_check_hostname)

    def describe(self) -> str:
        """Where this backend connects, for messages and logs (never the password)."""
        if self.mode == "client":
            return f"a ready {type(self.client).__name__} client"
        nodes = ",".join(_hostport_str(h, p) for h, p in self.nodes)
        if self.mode == "cluster":
            return f"redis cluster {nodes}"
        if self.mode == "sentinel":
            return f"redis sentinel service {self.service!r} via {nodes}"
        scheme = "rediss" if self.tls else "redis"
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}{':***' if self.password else ''}@"
        if self.unix_path is not None:
            return f"unix://{auth}{self.unix_path}?db={self.db}"
        return f"{scheme}://{auth}{_hostport_str(self.host or '', self.port)}/{self.db}"

    # -- parsing -------------------------------------------------------------------------------

    @classmethod
    def parse(
        cls, conn: str | Mapping[str, Any] | None, *, extra_keys: Collection[str] = ()
    ) -> RedisConfig:
        """Validate ``conn`` (URL, options dict or None) without any I/O.

        ``extra_keys`` are dict keys accepted and ignored (options of a wrapping backend).

        Raises:
            ConfigError: naming the option and why it is refused.
        """
        if conn is None or isinstance(conn, str):
            return _build(_parse_url(_url(conn)))
        if not isinstance(conn, Mapping):
            raise ConfigError(
                f"redis backend: connection must be a URL string or an options dict, got "
                f"{type(conn).__name__}"
            )
        allowed = _OPTIONS | set(_TARGETS) | _FACADE_KEYS | set(extra_keys)
        if unknown := sorted(str(k) for k in conn if k not in allowed):
            raise ConfigError(
                f"redis backend: unknown options {unknown}; known: {sorted(allowed - _FACADE_KEYS)}"
            )
        opts = {k: v for k, v in conn.items() if v is not None and k in _OPTIONS | set(_TARGETS)}
        targets = [k for k in _TARGETS if k in opts]
        if len(targets) > 1:
            raise ConfigError(
                f"redis backend: give one of url/cluster/sentinel/client, got {targets}"
            )
        kw: dict[str, Any]
        if "client" in opts:
            kw = _ready_client(opts.pop("client"))
        elif "cluster" in opts or "sentinel" in opts:
            mode = "cluster" if "cluster" in opts else "sentinel"
            kw = {"mode": mode, "nodes": _nodes(mode, opts.pop(mode)), "host": None}
            if mode == "sentinel" and "service" not in opts:
                raise ConfigError("redis backend: 'sentinel' needs 'service' (the master's name)")
        else:
            url = opts.pop("url", None)
            if url is not None and not isinstance(url, str):
                raise ConfigError(f"redis backend: url must be a str, got {type(url).__name__}")
            kw = _parse_url(_url(url))
        if "service" in opts and kw.get("mode") != "sentinel":
            raise ConfigError("redis backend: 'service' only goes with 'sentinel'")
        if "tls" in opts and kw.get("mode", "standalone") == "standalone":
            raise ConfigError("redis backend: choose TLS with the URL scheme (rediss://)")
        for name in sorted(set(opts) & set(kw)):
            raise ConfigError(f"redis backend: {name} given in the URL and as an option")
        return _build({**kw, **opts})


# -- helpers ----------------------------------------------------------------------------------


def _url(url: str | None) -> str:
    """The URL given, else ``ZEAL_REDIS_URL``, else the default; an empty one is refused."""
    source = "the URL"
    if url is None:
        url, source = os.environ.get("ZEAL_REDIS_URL", DEFAULT_URL), "ZEAL_REDIS_URL"
    if not url.strip():
        raise ConfigError(
            f"redis backend: {source} is empty (give redis://host:port/db; leave ZEAL_REDIS_URL "
            f"unset for {DEFAULT_URL})"
        )
    return url


def _hostport_str(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _build(fields: dict[str, Any]) -> RedisConfig:
    """The config of ``fields``, or a ConfigError naming the option (never echoing a secret)."""
    try:
        return RedisConfig.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else ""
        got = "" if "password" in name or not name else f", got {err['input']!r}"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"redis backend: {name + ': ' if name else ''}{msg}{got}") from None


def _query_value(name: str, text: str) -> Any:
    """A URL query option converted from text to the option's type (bounds are checked later)."""
    try:
        kind = cast(Any, RedisConfig.model_fields[name].annotation)
        return TypeAdapter(kind).validate_python(text.strip())
    except ValidationError as exc:
        raise ConfigError(
            f"redis backend: URL option {name}: {exc.errors()[0]['msg']}, got {text!r}"
        ) from None


def _ready_client(client: object) -> dict[str, Any]:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    if not isinstance(client, (Redis, RedisCluster)):
        raise ConfigError(
            "redis backend: 'client' must be a redis.asyncio.Redis or "
            f"redis.asyncio.cluster.RedisCluster, got {type(client).__name__}"
        )
    return {"mode": "client", "client": client, "host": None}


def _nodes(what: str, value: object) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"redis backend: {what} must be a non-empty list of 'host:port'")
    return tuple(_address(what, item) for item in value)


def _address(what: str, item: object) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a ``(host, port)`` pair."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        item = f"{item[0]}:{item[1]}"
    if not isinstance(item, str):
        raise ConfigError(f"redis backend: {what} entries are 'host:port', got {item!r}")
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep:
        raise ConfigError(f"redis backend: {what} address {item!r} needs host:port")
    if not host:
        raise ConfigError(f"redis backend: {what} address {item!r} has no host")
    if "[" in host or "]" in host:
        raise ConfigError(f"redis backend: bad {what} address {item!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"redis backend: {what} address {item!r}: port must be 1-65535")
    return host, int(port)


def _parse_url(url: str) -> dict[str, Any]:
    """Fields of a ``redis://``, ``rediss://`` or ``unix://`` URL (password never echoed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"redis backend: invalid URL ({exc})") from None
    scheme = parts.scheme.lower()
    kw: dict[str, Any] = {}
    if parts.username:
        kw["username"] = urllib.parse.unquote(parts.username)
    safe = url  # for messages: never the password
    if parts.password is not None:
        kw["password"] = urllib.parse.unquote(parts.password)
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        safe = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"redis backend: unix:// URL without a socket path: {safe}")
        kw.update(unix_path=parts.path, host=None)
    elif scheme in _SCHEMES:
        if not parts.hostname:
            raise ConfigError(f"redis backend: URL has no host: {safe}")
        kw.update(host=parts.hostname, port=port or 6379, tls=_SCHEMES[scheme])
        if path := parts.path.strip("/"):
            if not path.isdigit():
                raise ConfigError(f"redis backend: URL path must be a db number, got {safe}")
            kw["db"] = int(path)
    else:
        raise ConfigError(
            f"redis backend: unsupported URL scheme {parts.scheme!r} in {safe} "
            "(use redis://, rediss:// (or tls://) or unix://)"
        )
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    for name, values in query.items():
        if name not in _QUERY_OPTS:
            raise ConfigError(
                f"redis backend: unknown URL option {name!r} in {safe}; "
                f"known: {sorted(_QUERY_OPTS)}"
            )
        if len(values) != 1:
            raise ConfigError(f"redis backend: URL option {name!r} given more than once")
        if name == "db" and "db" in kw:
            raise ConfigError(f"redis backend: db given in the URL path and query: {safe}")
        kw[name] = _query_value(name, values[0])
    return kw
