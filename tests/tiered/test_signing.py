"""Signed envelopes: round trip, each rejection reason counted, key rotation, replay memory."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from zeal_asgi.errors import ConfigError, MessageRejectedError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.signing import REASONS, Signer, parse_envelope

SECRET = "s" * 32


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _reason(signer: Signer, raw: bytes | str) -> str:
    with pytest.raises(MessageRejectedError) as info:
        signer.verify(raw)
    return info.value.reason


def _resign(doc: dict[str, Any], secret: str = SECRET, context: str = "test") -> bytes:
    """Sign ``doc`` by hand (as a peer holding ``secret`` would) and encode it."""
    body = {k: v for k, v in doc.items() if k != "mac"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    doc = dict(
        body,
        mac=hmac.new(secret.encode(), context.encode() + b"\0" + canon, hashlib.sha256).hexdigest(),
    )
    return json.dumps(doc).encode()


def test_round_trip_and_envelope_fields() -> None:
    clock = Clock()
    s = Signer(SECRET, context="test", clock=clock, name="t_sign_rt")
    raw = s.sign({"to": "c1", "payload": "hé", "n": [1, 2]})
    doc = json.loads(raw)
    assert doc["v"] == 1 and doc["kid"] == "k1" and doc["ts"] == 1_700_000_000_000
    assert len(doc["nonce"]) == 32 and len(doc["mac"]) == 64
    assert s.verify(raw) == {"to": "c1", "payload": "hé", "n": [1, 2]}
    assert s.stats()["accepted"] == 1
    # the hand-made MAC agrees: the format is documented, not an accident of this code
    assert s.verify(_resign(dict(doc, nonce="0" * 32))) == {
        "to": "c1",
        "payload": "hé",
        "n": [1, 2],
    }


def test_each_reason_is_rejected_and_counted() -> None:
    clock = Clock()
    name = "t_sign_reasons"
    s = Signer(SECRET, context="test", clock=clock, name=name, max_bytes=1024)
    good = json.loads(s.sign({"x": 1}))

    forged = _resign(dict(good, x=2), secret="another secret of 32 bytes......")
    assert _reason(s, forged) == "bad_mac"
    tampered = json.dumps(dict(good, x=2)).encode()  # body changed, MAC kept
    assert _reason(s, tampered) == "bad_mac"
    assert _reason(s, _resign(dict(good, kid="k9"))) == "unknown_kid"
    assert _reason(s, _resign(dict(good, ts=good["ts"] - 31_000, nonce="1" * 32))) == "stale"
    assert _reason(s, _resign(dict(good, ts=good["ts"] + 31_000, nonce="2" * 32))) == "stale"
    assert s.verify(json.dumps(good)) == {"x": 1}
    assert _reason(s, json.dumps(good)) == "replay"
    assert _reason(s, s.sign({"x": 1})[:-1] + b" " * 2000) == "oversize"
    for bad in (
        b"not json",
        b"[1,2]",
        b'{"v":1,"v":1}',
        b'{"x":NaN}',
        b"\xff\xfe",
        json.dumps(dict(good, v=2)).encode(),
        json.dumps(dict(good, v=True)).encode(),
        json.dumps(dict(good, ts="1")).encode(),
        json.dumps(dict(good, nonce="XYZ")).encode(),
        json.dumps({k: v for k, v in good.items() if k != "mac"}).encode(),
        b"[" * 900,
    ):
        assert _reason(s, bad) == "malformed", bad
    counts = s.stats()
    assert counts["rejected"] == {
        "bad_mac": 2,
        "unknown_kid": 1,
        "stale": 2,
        "replay": 1,
        "oversize": 1,
        "malformed": 11,
    }
    assert counts["host"]["rejected"] == counts["rejected"]  # one worker: host == worker
    assert host_stats().worker()[f"{name}_rejected_malformed_total"] == 11


def test_key_rotation_and_context_binding() -> None:
    old = Signer({"k1": SECRET}, context="ws", name="t_sign_rot")
    both = Signer({"k1": SECRET, "k2": "n" * 32}, kid="k2", context="ws", name="t_sign_rot")
    assert both.verify(old.sign({"a": 1})) == {"a": 1}  # old key still verifies
    assert json.loads(both.sign({"a": 1}))["kid"] == "k2"
    assert _reason(old, both.sign({"a": 1})) == "unknown_kid"
    other_purpose = Signer(SECRET, context="tiered", name="t_sign_rot")
    assert _reason(other_purpose, old.sign({"a": 1})) == "bad_mac"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"secret": "short"}, "at least 16"),
        ({"secret": {}}, "empty"),
        ({"secret": {"a": SECRET, "b": SECRET}}, "kid="),
        ({"secret": SECRET, "kid": "bad kid!"}, "key id"),
        ({"secret": {"a": SECRET}, "kid": "b"}, "not in the keyring"),
        ({"secret": SECRET, "window": 0}, "window"),
        ({"secret": SECRET, "window": float("nan")}, "window"),
        ({"secret": SECRET, "max_bytes": 10}, "max_bytes"),
        ({"secret": SECRET, "replay_capacity": 0}, "replay_capacity"),
    ],
)
def test_bad_configuration(kwargs: dict[str, Any], fragment: str) -> None:
    secret = kwargs.pop("secret")
    with pytest.raises(ConfigError, match=fragment):
        Signer(secret, **kwargs)


def test_sign_refuses_reserved_fields_and_unserialisable_values() -> None:
    s = Signer(SECRET, max_bytes=256)
    with pytest.raises(ValueError, match="reserved"):
        s.sign({"mac": "x"})
    with pytest.raises(ValueError, match="JSON"):
        s.sign({"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        s.sign({"x": float("nan")})
    with pytest.raises(ValueError, match="max_bytes"):
        s.sign({"x": "y" * 300})


def test_replay_memory_overflow_never_accepts_a_replay() -> None:
    clock = Clock()
    s = Signer(SECRET, replay_capacity=3, clock=clock, name="t_sign_cap")
    msgs = []
    for _ in range(5):
        msgs.append(s.sign({}))
        clock.now += 0.001
    for m in msgs:
        s.verify(m)
    # the two oldest nonces were forgotten: their messages are refused, not accepted again
    assert [_reason(s, m) for m in msgs] == ["replay"] * 5
    # nonces expire with the window: memory does not grow without bound
    clock.now += 31
    fresh = s.sign({})
    s.verify(fresh)
    assert len(s._seen) == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_fuzz_only_typed_rejections(raw: bytes) -> None:
    s = Signer(SECRET, name="t_sign_fuzz")
    with pytest.raises(MessageRejectedError) as info:
        s.verify(raw)
    assert info.value.reason in REASONS


def test_parse_envelope_limits() -> None:
    with pytest.raises(MessageRejectedError, match="exceeds 64"):
        parse_envelope(b"{" + b" " * 80 + b"}", 64)
    with pytest.raises(MessageRejectedError) as info:
        parse_envelope(123, 64)  # type: ignore[arg-type]
    assert info.value.reason == "malformed"
    assert parse_envelope('{"a": 1}', 64) == {"a": 1}
