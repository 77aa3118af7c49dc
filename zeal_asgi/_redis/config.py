"""Connection options of the Redis backend: parsed and validated up front, without any I/O.

``RedisConfig.parse(conn)`` accepts a URL, an options dict or ``None`` (then ``ZEAL_REDIS_URL``,
else ``redis://127.0.0.1:6379/0``).  Every knob the client library has a default for is set here
explicitly, because those defaults keep changing between releases.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from zeal_asgi.errors import ConfigError

__all__ = ["DEFAULT_URL", "RedisConfig"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SCHEMES = {"redis": False, "valkey": False, "rediss": True, "valkeys": True, "tls": True}
"""URL schemes and whether they mean TLS (``tls://`` is the seed's spelling of ``rediss://``)."""
_CERT_REQS = ("required", "optional", "none")

# Options that a URL query string may set too (same names, same types as the dict keys).
_FLOAT_OPTS = ("socket_timeout", "connect_timeout", "acquire_timeout", "deadline")
_SCALAR_OPTS: dict[str, type] = {
    "pool_size": int,
    "retries": int,
    "db": int,
    "socket_timeout": float,
    "connect_timeout": float,
    "acquire_timeout": float,
    "deadline": float,
    "health_check_interval": float,
    "ssl_ca_certs": str,
    "ssl_certfile": str,
    "ssl_keyfile": str,
    "ssl_cert_reqs": str,
    "ssl_check_hostname": bool,
}
_DICT_ONLY = {
    "url",
    "prefix",
    "cluster",
    "sentinel",
    "service",
    "client",
    "username",
    "password",
    "sentinel_password",
    "tls",
}
_FACADE_KEYS = {"on_error", "breaker"}
"""Read by the Store facade (circuit breaker), accepted and ignored here."""


@dataclass(frozen=True)
class RedisConfig:
    """Validated options of one Redis backend (standalone, Cluster, Sentinel or a ready client).

    Dict keys (and URL query options, for the scalar ones) have the names of these fields;
    ``url``, ``cluster``, ``sentinel`` (+ ``service``) and ``client`` choose the target.
    """

    mode: str = "standalone"
    """``standalone``, ``cluster``, ``sentinel`` or ``client`` (a ready redis.asyncio client)."""
    host: str | None = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    """``unix:///path/to/redis.sock`` URLs."""
    db: int = 0
    username: str | None = None
    """ACL user (URL ``redis://user:password@host``, or the option for Cluster/Sentinel)."""
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    """``rediss://``; the ``tls`` option for Cluster and Sentinel (data nodes and sentinels)."""
    nodes: tuple[tuple[str, int], ...] = ()
    """Cluster startup nodes, or the sentinels."""
    service: str | None = None
    """The master's name, with ``sentinel``."""
    sentinel_password: str | None = field(default=None, repr=False)
    client: Any = field(default=None, compare=False)
    pool_size: int = 8
    """Connections (and concurrent calls) per worker and event loop."""
    prefix: str = "zeal"
    """First part of every key and channel."""
    socket_timeout: float = 1.0
    """Seconds to wait for one reply."""
    connect_timeout: float = 1.0
    """Seconds to open a connection (TCP and TLS)."""
    acquire_timeout: float = 0.5
    """Seconds to wait for a free connection before PoolTimeoutError.  Short enough to shed load
    instead of queueing without bound, long enough that a busy worker (dozens of requests in
    flight on its 8 connections, its event loop saturated) does not fail requests that a
    healthy Redis would serve a few milliseconds later."""
    health_check_interval: float = 15.0
    """An idle connection is PINGed before reuse after this many seconds (0: never)."""
    retries: int = 2
    """Extra attempts of an idempotent command after a connection error or timeout."""
    deadline: float = 0.0
    """Upper bound of one call (slot, connect, command, retries, backoff); 0: the default,
    ``acquire_timeout + socket_timeout``."""
    ssl_ca_certs: str | None = None
    """CA bundle that signs the server certificate (default: the system's)."""
    ssl_certfile: str | None = None
    """Client certificate (mutual TLS), with ``ssl_keyfile``."""
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    """``required`` (default); ``optional``/``none`` weaken TLS and log a warning every start."""
    ssl_check_hostname: bool = True
    """Check the certificate names the host; ``False`` logs a warning every start."""

    def __post_init__(self) -> None:
        if self.deadline == 0.0:
            # A call may wait for a slot, then for the command: nothing longer, whatever retries.
            object.__setattr__(self, "deadline", self.acquire_timeout + self.socket_timeout)

    # -- derived -------------------------------------------------------------------------------

    @property
    def verification_weakened(self) -> bool:
        """True when TLS is on but the certificate or the host name is not verified."""
        return self.tls and (self.ssl_cert_reqs != "required" or not self.ssl_check_hostname)

    def describe(self) -> str:
        """Where this backend connects, for messages and logs (never the password)."""
        if self.mode == "client":
            return f"a ready {type(self.client).__name__} client"
        if self.mode == "cluster":
            return "redis cluster " + ",".join(_hostport_str(h, p) for h, p in self.nodes)
        if self.mode == "sentinel":
            nodes = ",".join(_hostport_str(h, p) for h, p in self.nodes)
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
        cls,
        conn: str | Mapping[str, Any] | None,
        *,
        environ: Mapping[str, str] | None = None,
        extra_keys: Collection[str] = (),
    ) -> RedisConfig:
        """Validate ``conn`` (URL, options dict or None) without any I/O.

        ``extra_keys`` are dict keys accepted and ignored (options of a wrapping backend).

        Raises:
            ConfigError: naming the option and why it is refused.
        """
        env = os.environ if environ is None else environ
        if conn is None or isinstance(conn, str):
            return _checked(cls(**_parse_url(_url(conn, env))))
        if not isinstance(conn, Mapping):
            raise ConfigError(
                f"redis backend: connection must be a URL string or an options dict, got "
                f"{type(conn).__name__}"
            )
        allowed = set(_SCALAR_OPTS) | _DICT_ONLY | _FACADE_KEYS | set(extra_keys)
        unknown = sorted(str(k) for k in conn if k not in allowed)
        if unknown:
            raise ConfigError(
                f"redis backend: unknown options {unknown}; known: {sorted(allowed - _FACADE_KEYS)}"
            )
        opts = {k: v for k, v in conn.items() if v is not None and k not in _FACADE_KEYS}
        for k in extra_keys:
            opts.pop(k, None)
        targets = [k for k in ("url", "cluster", "sentinel", "client") if k in opts]
        if len(targets) > 1:
            raise ConfigError(
                f"redis backend: give one of url/cluster/sentinel/client, got {targets}"
            )
        kw: dict[str, Any] = {}
        if "client" in opts:
            kw.update(_ready_client(opts.pop("client")))
        elif "cluster" in opts:
            kw.update(mode="cluster", nodes=_nodes("cluster", opts.pop("cluster")), host=None)
        elif "sentinel" in opts:
            kw.update(mode="sentinel", nodes=_nodes("sentinel", opts.pop("sentinel")), host=None)
            service = opts.pop("service", None)
            if not isinstance(service, str) or not service:
                raise ConfigError("redis backend: 'sentinel' needs 'service' (the master's name)")
            kw["service"] = service
        else:
            url = opts.pop("url", None)
            if url is not None and not isinstance(url, str):
                raise ConfigError(f"redis backend: url must be a str, got {type(url).__name__}")
            kw.update(_parse_url(_url(url, env)))
        if "service" in opts:
            raise ConfigError("redis backend: 'service' only goes with 'sentinel'")
        if "prefix" in opts:
            kw["prefix"] = _prefix(opts.pop("prefix"))
        for name in ("username", "password", "sentinel_password"):
            if name in opts:
                value = opts.pop(name)
                if not isinstance(value, str):
                    raise ConfigError(f"redis backend: {name} must be a str")
                if name in kw:
                    raise ConfigError(f"redis backend: {name} given in the URL and as an option")
                kw[name] = value
        if "tls" in opts:
            if kw.get("mode", "standalone") == "standalone":
                raise ConfigError("redis backend: choose TLS with the URL scheme (rediss://)")
            kw["tls"] = _typed("tls", opts.pop("tls"), bool)
        for name, value in opts.items():
            if name in kw:
                raise ConfigError(f"redis backend: {name} given in the URL and as an option")
            kw[name] = _typed(name, value, _SCALAR_OPTS[name])
        if kw.get("mode") == "cluster" and kw.get("db"):
            raise ConfigError("redis backend: a Redis Cluster has only db 0")
        return _checked(cls(**kw))


# -- helpers ----------------------------------------------------------------------------------


def _url(url: str | None, env: Mapping[str, str]) -> str:
    """The URL given, else ``ZEAL_REDIS_URL``, else the default; an empty one is refused."""
    source = "the URL"
    if url is None:
        url, source = env.get("ZEAL_REDIS_URL", DEFAULT_URL), "ZEAL_REDIS_URL"
    if not url.strip():
        raise ConfigError(
            f"redis backend: {source} is empty (give redis://host:port/db; leave ZEAL_REDIS_URL "
            f"unset for {DEFAULT_URL})"
        )
    return url


def _hostport_str(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _prefix(value: object) -> str:
    if not isinstance(value, str) or _PREFIX_RE.fullmatch(value) is None:
        raise ConfigError(
            f"redis backend: prefix must be 1-64 characters of [A-Za-z0-9_.-], got {value!r} "
            "(no braces or colons: they shape Redis Cluster hash tags and key separators)"
        )
    return value


def _typed(name: str, value: object, kind: type, *, text: bool = False) -> Any:
    """Check one scalar option (``text``: convert it from a URL query string first)."""
    if text and isinstance(value, str) and kind is not str:
        word = value.strip().lower()
        try:
            if kind is bool:
                if word not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(word)
                value = word in ("1", "true", "yes", "on")
            else:
                value = kind(word)
        except ValueError:
            raise ConfigError(
                f"redis backend: {name} must be {kind.__name__}, got {value!r}"
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"redis backend: {name} must be {kind.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _checked(cfg: RedisConfig) -> RedisConfig:
    if not 1 <= cfg.pool_size <= 1024:
        raise ConfigError(
            f"redis backend: pool_size must be between 1 and 1024, got {cfg.pool_size}"
        )
    if not 0 <= cfg.retries <= 10:
        raise ConfigError(f"redis backend: retries must be between 0 and 10, got {cfg.retries}")
    if cfg.db < 0:
        raise ConfigError(f"redis backend: db must be >= 0, got {cfg.db}")
    for name in _FLOAT_OPTS:
        v = getattr(cfg, name)
        if not (math.isfinite(v) and 0 < v <= 3600):
            raise ConfigError(f"redis backend: {name} must be > 0 and <= 3600 seconds, got {v}")
    hc = cfg.health_check_interval
    if not (math.isfinite(hc) and 0 <= hc <= 86400):
        raise ConfigError(f"redis backend: health_check_interval must be 0-86400 s, got {hc}")
    if cfg.ssl_cert_reqs not in _CERT_REQS:
        raise ConfigError(
            f"redis backend: ssl_cert_reqs must be one of {_CERT_REQS}, got {cfg.ssl_cert_reqs!r}"
        )
    tls_files = (cfg.ssl_ca_certs, cfg.ssl_certfile, cfg.ssl_keyfile)
    if not cfg.tls and any(f is not None for f in tls_files):
        raise ConfigError(
            "redis backend: ssl_* options need TLS: use a rediss:// URL (or tls=True)"
        )
    if (cfg.ssl_certfile is None) != (cfg.ssl_keyfile is None):
        raise ConfigError("redis backend: ssl_certfile and ssl_keyfile go together (client cert)")
    return cfg


def _ready_client(client: object) -> dict[str, Any]:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    if not isinstance(client, (Redis, RedisCluster)):
        raise ConfigError(
            "redis backend: 'client' must be a redis.asyncio.Redis or "
            f"redis.asyncio.cluster.RedisCluster, got {type(client).__name__}"
        )
    return {"mode": "client", "client": client, "host": None}


def _split_hostport(what: str, text: str, default_port: int | None) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"redis backend: bad {what} address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not host:
        raise ConfigError(f"redis backend: {what} address {text!r} has no host")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"redis backend: {what} address {text!r} needs host:port")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"redis backend: {what} address {text!r}: port must be 1-65535")
    return host, int(port_text)


def _nodes(what: str, value: object) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"redis backend: {what} must be a non-empty list of 'host:port'")
    out = []
    for item in value:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            item = f"{item[0]}:{item[1]}"
        if not isinstance(item, str):
            raise ConfigError(f"redis backend: {what} entries are 'host:port', got {item!r}")
        out.append(_split_hostport(what, item, None))
    return tuple(out)


def _parse_url(url: str) -> dict[str, Any]:
    """Fields of a ``redis://``, ``rediss://`` or ``unix://`` URL (password never echoed)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"redis backend: invalid URL ({exc})") from None
    scheme = parts.scheme.lower()
    safe = _redact(url)
    kw: dict[str, Any] = {}
    if parts.username:
        kw["username"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        kw["password"] = urllib.parse.unquote(parts.password)
    if scheme == "unix":
        if not parts.path:
            raise ConfigError(f"redis backend: unix:// URL without a socket path: {safe}")
        kw.update(unix_path=parts.path, host=None)
    elif scheme in _SCHEMES:
        if not parts.hostname:
            raise ConfigError(f"redis backend: URL has no host: {safe}")
        kw.update(host=parts.hostname, port=port or 6379, tls=_SCHEMES[scheme])
        path = parts.path.strip("/")
        if path:
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
        if name not in _SCALAR_OPTS:
            raise ConfigError(
                f"redis backend: unknown URL option {name!r} in {safe}; "
                f"known: {sorted(_SCALAR_OPTS)}"
            )
        if len(values) != 1:
            raise ConfigError(f"redis backend: URL option {name!r} given more than once")
        if name == "db" and "db" in kw:
            raise ConfigError(f"redis backend: db given in the URL path and query: {safe}")
        kw[name] = _typed(name, values[0], _SCALAR_OPTS[name], text=True)
    return kw


def _redact(url: str) -> str:
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparsable URL>"
