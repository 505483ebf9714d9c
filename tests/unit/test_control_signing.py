"""The signing rules of the control plane, without a broker: which key must have signed
an event, per-purpose MAC keys bound to the incarnation, and the codec's signed records."""
from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from journal.batch import Sequencer
from journal.errors import CorruptEntry
from journal.ops import Op
from journal.events import Created, Deleted
from journal.pairs import PairSpec, fold, signer
from schemas import codec
from schemas.cipher import JournalKey, open_record

KEY = JournalKey(bytes(range(32)))
KEYED = PairSpec("p", "/s", "/t", 65536, 1 << 20, key_id=KEY.key_id)
PLAIN = PairSpec("q", "/s", "/t", 65536, 1 << 20)


def _record(event: str = "promoted", pair: str = "p", **attrs: str) -> bytes:
    return codec.encode(codec.CONTROL, {"event": event, "pair": pair, "at_ms": 5,
                                        "spec": None, "attrs": attrs})


def test_the_fold_stamps_the_incarnation_and_signer_names_the_key():
    pairs = fold([Created(pair="p", at_ms=100, spec=KEYED),
                  Created(pair="q", at_ms=7, spec=PLAIN)])
    assert pairs["p"].spec.incarnation == 100
    # An existing keyed pair: every event, a new 'created' too, needs its key.
    for ev in (Deleted(pair="p", at_ms=200),
               Created(pair="p", at_ms=300, spec=replace(KEYED, key_id=""))):
        assert signer(pairs, ev) == pairs["p"].spec
    # A new keyed pair signs its own 'created'; unkeyed pairs sign nothing.
    assert signer({}, Created(pair="p", at_ms=9, spec=KEYED)).incarnation == 9
    assert signer(pairs, Deleted(pair="q", at_ms=200)) is None
    assert signer({}, Deleted(pair="p", at_ms=200)) is None


def test_mac_keys_differ_by_purpose_and_incarnation():
    a, b = KEY.bound(1), KEY.bound(2)
    body = _record()
    macs = {a.control_mac(body), a.status_mac(body), b.control_mac(body),
            JournalKey(bytes(32)).bound(1).control_mac(body)}
    assert len(macs) == 4
    assert a.mac_key != b.mac_key and a.key_id == b.key_id


def _entry(key: JournalKey) -> bytes:
    s = Sequencer("p", 1, key=key.mac_key)
    (entry,) = [e for op in (Op.write(0, b"x" * 4096), Op.flush()) for e in s.add(op, 1)]
    return codec.encode_entry(key.encrypt(entry))


def test_a_record_of_another_incarnation_fails_authentication():
    old, new = KEY.bound(1), KEY.bound(2)
    assert open_record(_entry(old), "p", old, "here").ops
    with pytest.raises(CorruptEntry, match="earlier pair of this name"):
        open_record(_entry(old), "p", new, "here")


@given(st.dictionaries(st.sampled_from(["epoch", "seq", "request", "reason"]),
                       st.text(max_size=20)))
def test_sign_and_check_round_trip(attrs):
    key = KEY.bound(3)
    signed = codec.sign(codec.CONTROL, _record(**attrs), key.control_mac)
    mac, body = codec.signed_body(codec.CONTROL, signed)
    assert mac == key.control_mac(body) and body == _record(**attrs)
    # Any change of a value gives another body, so the carried MAC no longer matches.
    altered = codec.encode(codec.CONTROL, {**codec.decode(signed, codec.CONTROL),
                                           "at_ms": 6})
    mac2, body2 = codec.signed_body(codec.CONTROL, altered)
    assert mac2 == mac and key.control_mac(body2) != mac


def test_records_written_before_the_mac_field_still_read():
    for old, new, record in (
            (codec.CONTROL_V1, codec.CONTROL, {"event": "created", "pair": "p", "at_ms": 1,
                                               "spec": None, "attrs": {}}),
            (codec.HEARTBEAT_V1, codec.HEARTBEAT, {
                "pair": "p", "role": "capturer", "instance": "/s", "host": "h", "pid": 1,
                "at_ms": 1, "state": "capturing", "epoch": 1, "seq": 2, "epoch_bytes": 3,
                "captured_at_ms": 4, "rate_bps": 0.0, "detail": {}})):
        data = codec.encode(old, record)
        assert old.fingerprint != new.fingerprint
        decoded = codec.decode(data, new)
        assert {k: v for k, v in decoded.items() if k != "mac"} == record
        assert codec.signed_body(new, data)[0] == b""      # unsigned: fails any check
