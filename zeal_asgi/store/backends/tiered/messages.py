"""Invalidation messages of the tiered backend: encoding, signing, strict decoding.

One message says "drop these keys of this table from your L1" (``op="keys"``) or "drop the whole
table" (``op="clear"``)::

    {"v": 1, "kid": "k1", "ts": 1700000000123, "nonce": "<32 hex>", "origin": "<node>",
     "ns": "<table>", "op": "keys", "keys": ["<hex of the key bytes>", ...], "mac": "<64 hex>"}

With a secret the message is a :class:`~zeal_asgi.signing.Signer` envelope (HMAC-SHA256, key id,
timestamp, nonce): forged, replayed, stale, oversize and malformed messages are dropped and
counted per reason.  Without one the same fields travel unsigned (``v``, ``ts``, ``nonce`` only),
still strictly checked.  Keys travel as hex so binary keys survive JSON.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from zeal_asgi.errors import MessageRejectedError
from zeal_asgi.shm.schema import MAX_KEY_SIZE
from zeal_asgi.signing import RejectionCounter, Signer, parse_envelope

Secret = str | bytes | Mapping[str, str | bytes]
"""One secret, or a ``{kid: secret}`` keyring, as :class:`~zeal_asgi.signing.Signer` takes."""
MAX_KEYS = 256
"""Keys per message; larger batches are split."""
MAX_BYTES = 64 * 1024
_HEX_RE = re.compile(r"^(?:[0-9a-f]{2})+$")
_NAME_MAX = 256
_OPS = ("keys", "clear")


class Invalidation(NamedTuple):
    """A decoded invalidation."""

    origin: str
    table: str
    op: str
    keys: tuple[bytes, ...]


class InvalidationCodec:
    """Encodes and decodes invalidations; one per tiered backend and worker.

    Args:
        secret: signs and verifies (a :class:`~zeal_asgi.signing.Signer` keyring); ``None`` or
            empty sends and accepts unsigned messages.  Either way rejections are counted as
            ``tiered_invalidation_rejected_<reason>_total``.
        kid: the key id that signs.
    """

    def __init__(self, secret: Secret | None = None, kid: str | None = None) -> None:
        name = "tiered_invalidation"
        signer = (
            Signer(secret, kid=kid, context="zeal-tiered-invalidation", name=name)
            if secret
            else None
        )
        self.signer = signer
        self.counter = signer.counter if signer else RejectionCounter(name)
        self.max_bytes = signer.max_bytes if signer else MAX_BYTES

    def encode(self, origin: str, table: str, op: str, keys: Sequence[bytes] = ()) -> list[bytes]:
        """The messages for ``op`` on ``keys`` (split so each fits ``MAX_KEYS`` / the size cap)."""
        budget = self.max_bytes - 512 - len(origin) - len(table)
        batches: list[list[str]] = [[]]
        size = 0
        for h in (k.hex() for k in keys):
            if batches[-1] and (len(batches[-1]) >= MAX_KEYS or size + len(h) + 3 > budget):
                batches.append([])
                size = 0
            batches[-1].append(h)
            size += len(h) + 3
        # A clear carries no keys; a drop of no keys is no message at all.
        return [self._one(origin, table, op, b) for b in batches if b or op == "clear"]

    def _one(self, origin: str, table: str, op: str, keys: list[str]) -> bytes:
        fields = {"origin": origin, "ns": table, "op": op, "keys": keys}
        if self.signer is not None:
            return self.signer.sign(fields)
        doc = dict(fields, v=1, ts=int(time.time() * 1000), nonce=secrets.token_hex(16))
        return json.dumps(doc, separators=(",", ":")).encode()

    def decode(self, raw: bytes | str) -> Invalidation:
        """The invalidation in ``raw``; a bad one raises MessageRejectedError (and is counted)."""
        if self.signer is not None:
            doc = self.signer.verify(raw, _check_body)
        else:
            try:
                doc = parse_envelope(raw, self.max_bytes)
                if type(doc.get("v")) is not int or doc["v"] != 1:
                    raise MessageRejectedError("malformed", "unsigned invalidation without v=1")
                _check_body(doc)
            except MessageRejectedError as exc:
                self.counter.reject(exc.reason)
                raise
            self.counter.accept()
        keys = tuple(bytes.fromhex(k) for k in doc["keys"])
        return Invalidation(doc["origin"], doc["ns"], doc["op"], keys)


def _check_body(doc: Mapping[str, Any]) -> None:
    origin, ns, op, keys = (doc.get(k) for k in ("origin", "ns", "op", "keys"))
    for label, value in (("origin", origin), ("ns", ns)):
        if not isinstance(value, str) or not 0 < len(value) <= _NAME_MAX:
            raise MessageRejectedError("malformed", f"{label} must be a str of 1-{_NAME_MAX}")
    if op not in _OPS:
        raise MessageRejectedError("malformed", f"op must be one of {_OPS}")
    if not isinstance(keys, list):
        raise MessageRejectedError("malformed", "keys must be a list")
    if len(keys) > MAX_KEYS:
        raise MessageRejectedError("oversize", f"{len(keys)} keys; at most {MAX_KEYS}")
    if op == "clear" and keys:
        raise MessageRejectedError("malformed", "a clear carries no keys")
    for k in keys:
        if not isinstance(k, str) or not _HEX_RE.match(k):
            raise MessageRejectedError("malformed", "keys are lowercase hex strings")
        if len(k) > 2 * MAX_KEY_SIZE:
            raise MessageRejectedError("oversize", f"a key longer than {MAX_KEY_SIZE} bytes")
