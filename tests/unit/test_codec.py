"""The one codec: single-object encoding round trips, and every bad record is refused by name."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from journal.batch import Sequencer
from journal.digest import digest_of
from journal.errors import CorruptEntry, UnknownFingerprint
from journal.ops import Entry, Op, OpKind
from schemas import codec
from tests.fuzz import count

ops = st.one_of(
    st.builds(Op.write, st.integers(0, 2**40), st.binary(min_size=1, max_size=4096)),
    st.builds(Op.zero, st.integers(0, 2**40), st.integers(1, 2**30)),
    st.builds(Op.trim, st.integers(0, 2**40), st.integers(1, 2**30)),
    st.builds(Op.fill, st.integers(0, 2**40), st.integers(1, 2**30), st.integers(1, 255)),
    st.just(Op.flush()),
)


@given(st.lists(ops, min_size=1, max_size=30), st.integers(1, 1000))
@settings(max_examples=200, deadline=None)
def test_entries_round_trip_and_keep_their_digest(op_list, epoch):
    seq = Sequencer("p", epoch, budget=16 * 1024)
    entries = [e for op in op_list for e in seq.add(op, 1234)]
    last = seq.close(99)
    entries += [last] if last else []
    for entry in entries:
        back = codec.decode_entry(codec.encode_entry(entry))
        assert back == entry
        assert back.digest == digest_of(back)


def test_single_object_header_is_magic_and_fingerprint():
    data = codec.encode(codec.CONTROL, {"event": "deleted", "pair": "p", "at_ms": 1,
                                        "spec": None, "attrs": {}})
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == codec.CONTROL.fingerprint
    assert len({codec.ENTRY.fingerprint, codec.CONTROL.fingerprint,
                codec.HEARTBEAT.fingerprint}) == 3


def _entry_bytes() -> bytes:
    (entry,) = Sequencer("p", 1).add(Op.flush(), 1)
    return codec.encode_entry(entry)


def test_unknown_fingerprint_is_refused_by_name():
    data = bytearray(_entry_bytes())
    data[2:10] = b"\x00" * 8
    with pytest.raises(UnknownFingerprint, match="unknown schema fingerprint 0000000000000000"):
        codec.decode_entry(bytes(data))


def test_missing_magic_is_refused():
    with pytest.raises(CorruptEntry, match="not an x2x record"):
        codec.decode_entry(b"hello world, not avro")


def test_truncated_record_is_refused():
    data = _entry_bytes()
    with pytest.raises(CorruptEntry, match="does not decode"):
        codec.decode_entry(data[:-5])


def test_trailing_garbage_is_refused():
    with pytest.raises(CorruptEntry, match="trailing bytes"):
        codec.decode_entry(_entry_bytes() + b"xx")


def test_record_of_another_schema_is_refused():
    data = codec.encode(codec.CONTROL, {"event": "deleted", "pair": "p", "at_ms": 1,
                                        "spec": None, "attrs": {}})
    with pytest.raises(CorruptEntry, match="is a ControlEvent, expected a JournalEntry"):
        codec.decode_entry(data)


@given(st.binary(max_size=200))
@settings(max_examples=2000)
def test_garbage_only_ever_raises_corrupt_entry(blob):
    try:
        codec.decode_entry(codec.MAGIC + codec.ENTRY.fingerprint + blob)
    except CorruptEntry:
        count("journal decoder, random bodies", "rejected")
    else:
        count("journal decoder, random bodies", "decoded")


@given(st.lists(ops, min_size=0, max_size=30), st.integers(-2**63, 2**63 - 1),
       st.integers(0, 2**63 - 1), st.text(max_size=40), st.binary(max_size=64),
       st.sampled_from(["", "aes-256-gcm"]))
@settings(max_examples=300, deadline=None)
def test_fast_entry_encoding_is_byte_for_byte_fastavros(op_list, epoch, seq, pair, digest,
                                                         cipher):
    """The capture path's encoder writes exactly the bytes fastavro writes for the schema."""
    entry = Entry(pair, epoch, seq, -epoch // 3, seq // 2, tuple(op_list), digest, cipher)
    reference = codec.encode(codec.ENTRY, {
        "pair": entry.pair, "epoch": entry.epoch, "first_seq": entry.first_seq,
        "captured_at_ms": entry.captured_at_ms, "epoch_bytes": entry.epoch_bytes,
        "ops": [{"kind": op.kind.value, "offset": op.offset, "length": op.length,
                 "data": bytes(op.data)} for op in entry.ops],
        "digest": entry.digest, "cipher": entry.cipher})
    assert codec.encode_entry(entry) == reference
    assert b"".join(codec.encode_entry_parts(entry)) == reference


def test_an_altered_byte_that_decodes_to_the_same_entry_is_still_refused():
    """fastavro reads a negative enum index as a Python list index: with 7 kinds, a
    flipped bit turning FLUSH (index 3, byte 0x06) into -4 (0x07) decodes to the very
    same op. The record is refused anyway: a journal record must be exactly x2x's
    encoding of what it decodes to."""
    assert len(OpKind) == 7
    (entry,) = Sequencer("p", 1).add(Op.flush(), 1)
    raw = codec.encode_entry(entry)
    at = raw.index(b"\x02\x06\x00\x00\x00\x00")            # one op: FLUSH, 0, 0, no data
    bent = raw[:at + 1] + b"\x07" + raw[at + 2:]
    assert codec.decode(bent, codec.ENTRY)["ops"][0]["kind"] == "FLUSH"
    with pytest.raises(CorruptEntry, match="not encoded the way x2x encodes it"):
        codec.decode_entry(bent)
    assert codec.decode_entry(raw) == entry


def _fastavro_entry(data: bytes) -> Entry:
    """The reference reading of a journal record: fastavro, then x2x's canonical check."""
    r = codec.decode(data, codec.ENTRY)
    ops = tuple(Op(OpKind(o["kind"]), o["offset"], o["length"], o["data"]) for o in r["ops"])
    entry = Entry(r["pair"], r["epoch"], r["first_seq"], r["captured_at_ms"],
                  r["epoch_bytes"], ops, r["digest"], r["cipher"])
    if not codec._canonical(entry, data):
        raise CorruptEntry("not canonical")
    return entry


@given(st.lists(ops, min_size=0, max_size=12), st.data())
@settings(max_examples=400, deadline=None)
def test_the_entry_reader_accepts_exactly_what_fastavro_and_the_canonical_check_accept(
        op_list, draw):
    """decode_entry reads records itself (payloads as views, not copies); on any record,
    intact or altered, it agrees with fastavro: same entry, or refused."""
    entry = Entry("pair", 3, 7, 11, 13, tuple(op_list), b"d" * 32)
    raw = bytearray(codec.encode_entry(entry))
    how = draw.draw(st.sampled_from(["intact", "flip", "cut", "insert"]))
    if how == "flip" and len(raw) > codec.HEADER_LEN:
        at = draw.draw(st.integers(codec.HEADER_LEN, len(raw) - 1))
        raw[at] ^= 1 << draw.draw(st.integers(0, 7))
    elif how == "cut":
        del raw[draw.draw(st.integers(codec.HEADER_LEN, len(raw))):]
    elif how == "insert":
        raw.insert(draw.draw(st.integers(codec.HEADER_LEN, len(raw))),
                   draw.draw(st.integers(0, 255)))
    data = bytes(raw)
    try:
        expected = _fastavro_entry(data)
    except CorruptEntry:
        with pytest.raises(CorruptEntry):
            codec.decode_entry(data)
        return
    assert codec.decode_entry(data) == expected


def test_write_payloads_are_read_in_place():
    entry = Entry("p", 1, 1, 0, 0, (Op.write(0, b"x" * 5000), Op.write(5000, b"y" * 10)))
    raw = codec.encode_entry(entry)
    back = codec.decode_entry(raw)
    assert back == entry
    assert all(isinstance(op.data, memoryview) and op.data.obj is raw for op in back.ops)
