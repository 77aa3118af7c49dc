"""Invalidation messages: batches split by key count and by size, each one decoding whole."""

from __future__ import annotations

import pytest

from zeal_asgi.shm.schema import MAX_KEY_SIZE
from zeal_asgi.store.backends.tiered.messages import MAX_KEYS, InvalidationCodec


@pytest.mark.parametrize("signed", [False, True])
def test_many_keys_split_into_messages_that_decode_in_order(signed: bool) -> None:
    codec = InvalidationCodec("s" * 32 if signed else None)
    assert (codec.signer is not None) is signed
    short = [b"k%d" % i for i in range(2 * MAX_KEYS + 10)]
    messages = codec.encode("node-a", "t", "keys", short)
    assert len(messages) == 3  # by count: 256 + 256 + 10
    big = [bytes([i]) * MAX_KEY_SIZE for i in range(20)]
    big_messages = codec.encode("node-a", "t", "keys", big)
    assert len(big_messages) > 1  # by size: 20 keys of 4 KiB do not fit one message
    for sent, keys in ((messages, short), (big_messages, big)):
        assert all(len(m) <= codec.max_bytes for m in sent)
        decoded = [codec.decode(m) for m in sent]
        assert [k for inv in decoded for k in inv.keys] == keys
        assert {(inv.origin, inv.table, inv.op) for inv in decoded} == {("node-a", "t", "keys")}


def test_clear_is_one_message_without_keys_and_no_keys_is_none() -> None:
    codec = InvalidationCodec(None)
    [clear] = codec.encode("node-a", "t", "clear")
    assert codec.decode(clear).op == "clear" and codec.decode(clear).keys == ()
    assert codec.encode("node-a", "t", "keys", []) == []
