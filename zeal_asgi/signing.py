"""HMAC-SHA256 signed JSON envelopes: key id, timestamp, nonce, replay window, rejection counters.

A signed envelope is one JSON object: the caller's fields plus ``v`` (format version), ``kid``
(which key signed it), ``ts`` (milliseconds since the epoch), ``nonce`` (128 random bits) and
``mac`` (HMAC-SHA256 over the canonical JSON of every other field, bound to a ``context`` so a
message signed for one purpose is never accepted for another)::

    signer = Signer("a long shared secret", context="ws")
    raw = signer.sign({"to": "client-7", "payload": "hi"})
    fields = signer.verify(raw)          # or MessageRejectedError(reason)

``verify`` rejects, and counts per reason: ``oversize`` (more bytes than ``max_bytes``),
``malformed`` (not JSON, wrong field types), ``unknown_kid``, ``bad_mac``, ``stale`` (``ts``
outside the window) and ``replay`` (a nonce already accepted within the window).  The signature
gives integrity and authenticity, not confidentiality.  Nothing is ever unpickled.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from zeal_asgi.errors import ConfigError, MessageRejectedError
from zeal_asgi.shm.hoststats import host_stats

REASONS = ("bad_mac", "unknown_kid", "stale", "replay", "oversize", "malformed")
"""Every reason a message is rejected for, in the order they are checked (oversize first)."""

RESERVED = frozenset({"v", "kid", "ts", "nonce", "mac"})
"""Envelope field names a caller cannot use."""

VERSION = 1
MIN_SECRET_BYTES = 16
_KID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_MAC_RE = re.compile(r"^[0-9a-f]{64}$")
_INT64 = 2**63 - 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # two parsers could disagree on which one wins: refuse both
        raise ValueError("duplicate field")
    return out


def parse_envelope(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    """The JSON object in ``raw``, or MessageRejectedError ``oversize`` / ``malformed``.

    Strict: no NaN/Infinity, no duplicate fields, the top level must be an object.  Used by
    :meth:`Signer.verify` and by receivers of unsigned messages, so both apply the same rules.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        raise MessageRejectedError("malformed", f"message is {type(raw).__name__}, not bytes")
    size = len(raw.encode("utf-8", "surrogatepass")) if isinstance(raw, str) else len(raw)
    if size > max_bytes:
        raise MessageRejectedError("oversize", f"message of {size} bytes exceeds {max_bytes}")
    text = raw if isinstance(raw, str) else bytes(raw)
    try:
        doc = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise MessageRejectedError("malformed", f"not a JSON message: {exc}") from None
    if not isinstance(doc, dict):
        raise MessageRejectedError("malformed", "a message is a JSON object")
    return doc


class RejectionCounter:
    """Accepted and rejected messages per reason, for this worker and (shared memory) the host.

    Host-wide counters are ``<name>_accepted_total`` and ``<name>_rejected_<reason>_total``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.accepted = 0
        self.rejected = dict.fromkeys(REASONS, 0)

    def accept(self) -> None:
        """Count one accepted message."""
        self.accepted += 1
        host_stats().incr(f"{self.name}_accepted_total")

    def reject(self, reason: str) -> None:
        """Count one rejected message (``reason`` is one of :data:`REASONS`)."""
        if reason not in self.rejected:
            raise ValueError(f"unknown rejection reason {reason!r}; one of {REASONS}")
        self.rejected[reason] += 1
        host_stats().incr(f"{self.name}_rejected_{reason}_total")

    def stats(self) -> dict[str, Any]:
        """This worker's counts, and the host's under ``host``."""
        host, name = host_stats().host(), self.name
        rejected = {r: host.get(f"{name}_rejected_{r}_total", 0) for r in REASONS}
        accepted = host.get(f"{name}_accepted_total", 0)
        return {
            "accepted": self.accepted,
            "rejected": dict(self.rejected),
            "host": {"accepted": accepted, "rejected": rejected},
        }


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _as_key(kid: str, secret: str | bytes) -> bytes:
    if not isinstance(kid, str) or not _KID_RE.match(kid):
        raise ConfigError(f"key id {kid!r} must match [A-Za-z0-9_.-]{{1,32}}")
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    if not isinstance(secret, bytes):
        raise ConfigError(f"secret of key {kid!r} must be str or bytes")
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"secret of key {kid!r} is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed"
        )
    return secret


class Signer:
    """Signs and verifies envelopes with a keyring of HMAC-SHA256 secrets.

    Args:
        secret: one secret (str or bytes, at least 16 bytes; key id ``kid`` or ``"k1"``), or a
            mapping ``{kid: secret}`` for key rotation (every key verifies; ``kid`` signs).
        kid: the key id that signs; required with a mapping of several keys.
        context: purpose of the messages (``"tiered"``, ``"ws"``); part of every MAC.
        window: seconds a timestamp may differ from this host's clock; also how long nonces are
            remembered.
        max_bytes: largest accepted message.
        replay_capacity: nonces remembered at most; past it the oldest are forgotten and every
            message not newer than them is refused as ``replay`` (never silently accepted).
        name: prefix of the host-wide counters (``<name>_rejected_<reason>_total``).
        clock: wall clock in seconds (tests).
    """

    def __init__(
        self,
        secret: str | bytes | Mapping[str, str | bytes],
        *,
        kid: str | None = None,
        context: str = "zeal",
        window: float = 30.0,
        max_bytes: int = 64 * 1024,
        replay_capacity: int = 200_000,
        name: str = "signed",
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = secret if isinstance(secret, Mapping) else {"k1" if kid is None else kid: secret}
        if not keys:
            raise ConfigError("the keyring is empty")
        self._keys = {k: _as_key(k, s) for k, s in keys.items()}
        if kid is None:
            if len(self._keys) > 1:
                raise ConfigError("a keyring of several keys needs kid= (the signing key)")
            kid = next(iter(self._keys))
        if kid not in self._keys:
            raise ConfigError(f"signing key id {kid!r} is not in the keyring {sorted(self._keys)}")
        for label, value, lo, hi, kind in (
            ("window", window, 0.001, 86400.0, (int, float)),
            ("max_bytes", max_bytes, 64, 64 * 1024 * 1024, int),
            ("replay_capacity", replay_capacity, 1, 100_000_000, int),
        ):
            if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
                raise ConfigError(f"{label} must be a number in [{lo}, {hi}], got {value!r}")
        self.kid = kid
        self.window = float(window)
        self.max_bytes = max_bytes
        self.replay_capacity = replay_capacity
        self._clock = clock
        self._prefix = context.encode("utf-8") + b"\x00"
        self._seen: collections.OrderedDict[str, int] = collections.OrderedDict()  # oldest first
        self._floor_ts = -1
        self.counter = RejectionCounter(name)

    def _mac(self, key: bytes, fields: Mapping[str, Any]) -> str:
        return hmac.new(key, self._prefix + _canonical(fields), hashlib.sha256).hexdigest()

    def sign(self, fields: Mapping[str, Any]) -> bytes:
        """The signed envelope of ``fields`` (JSON-serialisable values), as UTF-8 JSON bytes.

        Raises:
            ValueError: a reserved field name, a value JSON cannot carry, or a result larger
                than ``max_bytes``.
        """
        if clash := RESERVED.intersection(fields):
            raise ValueError(f"fields {sorted(clash)} are reserved by the envelope")
        ts, nonce = int(self._clock() * 1000), secrets.token_hex(16)
        doc: dict[str, Any] = {**fields, "v": VERSION, "kid": self.kid, "ts": ts, "nonce": nonce}
        try:
            doc["mac"] = self._mac(self._keys[self.kid], doc)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fields cannot be signed as JSON: {exc}") from exc
        raw = _canonical(doc)
        if len(raw) > self.max_bytes:
            raise ValueError(f"signed message is {len(raw)} bytes; max_bytes is {self.max_bytes}")
        return raw

    def verify(
        self, raw: bytes | str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """The fields of a valid envelope (without ``v/kid/ts/nonce/mac``); else a counted reject.

        ``check(fields)`` may validate the caller's own fields and raise MessageRejectedError
        (e.g. ``malformed``, ``oversize``); its rejections are counted like the envelope's.

        Raises:
            MessageRejectedError: ``reason`` is one of :data:`REASONS`.
        """
        try:
            fields = self._verify(raw)
            if check is not None:
                check(fields)
        except MessageRejectedError as exc:
            self.counter.reject(exc.reason)
            raise
        self.counter.accept()
        return fields

    def _verify(self, raw: bytes | str) -> dict[str, Any]:
        doc = parse_envelope(raw, self.max_bytes)
        v, kid, ts, nonce, mac = (doc.get(k) for k in ("v", "kid", "ts", "nonce", "mac"))
        if type(v) is not int or v != VERSION:
            raise MessageRejectedError("malformed", f"envelope version {v!r} is not {VERSION}")
        if not isinstance(kid, str) or not isinstance(nonce, str) or not isinstance(mac, str):
            raise MessageRejectedError("malformed", "kid, nonce and mac must be strings")
        if type(ts) is not int or not 0 <= ts <= _INT64:
            raise MessageRejectedError("malformed", "ts must be integer milliseconds")
        if not _NONCE_RE.match(nonce) or not _MAC_RE.match(mac):
            raise MessageRejectedError("malformed", "nonce or mac is not lowercase hex")
        key = self._keys.get(kid)
        if key is None:
            raise MessageRejectedError("unknown_kid", f"no key {kid[:40]!r} in the keyring")
        del doc["mac"]
        if not hmac.compare_digest(self._mac(key, doc), mac):
            raise MessageRejectedError("bad_mac", "the MAC does not match")
        now_ms, window_ms = int(self._clock() * 1000), int(self.window * 1000)
        if abs(now_ms - ts) > window_ms:
            raise MessageRejectedError(
                "stale",
                f"timestamp is {(now_ms - ts) / 1000:.1f} s from now (window {self.window} s)",
            )
        self._remember(nonce, ts, now_ms, window_ms)
        for k in RESERVED:
            doc.pop(k, None)
        return doc

    def _remember(self, nonce: str, ts: int, now_ms: int, window_ms: int) -> None:
        seen = self._seen
        # Nonces older than the window can go: the stale check refuses their messages anyway.
        while seen and next(iter(seen.values())) + window_ms < now_ms:
            seen.popitem(last=False)
        if nonce in seen or ts <= self._floor_ts:
            raise MessageRejectedError("replay", "nonce already seen within the window")
        seen[nonce] = ts
        while len(seen) > self.replay_capacity:
            self._floor_ts = max(self._floor_ts, seen.popitem(last=False)[1])

    def stats(self) -> dict[str, Any]:
        """Accepted and rejected counts of this worker, and of every worker of the host."""
        return self.counter.stats()
