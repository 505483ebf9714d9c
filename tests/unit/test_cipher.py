"""End-to-end protection: every forged, altered or misplaced record is refused by name.

The fuzz tests drive `open_record`, the exact path the applier takes before applying.
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from journal.batch import Sequencer
from journal.errors import BadInput, CorruptEntry
from journal.ops import Op
from schemas import codec
from schemas.cipher import JournalKey, create_key, load_key, open_record
from tests.fuzz import count

KEY = JournalKey(bytes(range(32)))
OTHER = JournalKey(bytes(32))
SECRET = b"TOP-SECRET-PAYLOAD" * 100


def sealed_record(key: JournalKey = KEY, pair: str = "p", seq: int = 1) -> bytes:
    s = Sequencer(pair, 1, next_seq=seq, key=key.mac_key)
    s.add(Op.write(4096, SECRET), 1)
    s.add(Op.zero(0, 4096), 1)
    s.add(Op.fill(8192, 4096, 0xA7), 1)
    (entry,) = s.add(Op.flush(), 1)
    return codec.encode_entry(key.encrypt(entry))


def test_round_trip_and_no_plaintext_on_the_wire():
    data = sealed_record()
    assert b"TOP-SECRET" not in data
    entry = open_record(data, "p", KEY, "t@0")
    assert entry.ops[0].data == SECRET and entry.cipher == ""
    # A FILL's byte is content too: encrypted like a WRITE's, and one byte again.
    assert entry.ops[2] == Op.fill(8192, 4096, 0xA7)
    sealed = codec.decode_entry(data).ops[2]
    assert len(sealed.data) > 1 and sealed.length == 4096


def test_forged_with_another_key_is_refused():
    with pytest.raises(CorruptEntry, match="fails authentication: forged with another key"):
        open_record(sealed_record(OTHER), "p", KEY, "t@0")


def test_plain_record_in_an_encrypted_journal_is_refused():
    (entry,) = Sequencer("p", 1).add(Op.flush(), 1)
    with pytest.raises(CorruptEntry, match="is not encrypted .* requires aes-256-gcm"):
        open_record(codec.encode_entry(entry), "p", KEY, "t@0")


def test_encrypted_record_without_a_key_is_refused():
    with pytest.raises(CorruptEntry, match="no key was given"):
        open_record(sealed_record(), "p", None, "t@0")


def test_header_altered_is_refused_by_the_mac():
    entry = codec.decode_entry(sealed_record())
    moved = replace(entry, first_seq=entry.first_seq + 5)       # a reorder attempt
    with pytest.raises(CorruptEntry, match="fails authentication|digest mismatch"):
        open_record(codec.encode_entry(moved), "p", KEY, "t@0")


def test_record_from_another_pair_is_refused():
    with pytest.raises(CorruptEntry, match="belongs to pair 'q'"):
        open_record(sealed_record(pair="q"), "p", KEY, "t@0")


@given(st.data())
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_mutation_of_an_encrypted_record_is_refused(data):
    raw = bytearray(sealed_record())
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[pos:]
    else:
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    with pytest.raises(CorruptEntry):
        open_record(bytes(raw), "p", KEY, "t@0")
    count(f"encrypted journal record, {kind}", "rejected")


@given(st.binary(max_size=512))
@settings(max_examples=3000, deadline=None)
def test_random_bytes_are_refused_cleanly(blob):
    with pytest.raises(CorruptEntry):
        open_record(codec.MAGIC + codec.ENTRY.fingerprint + blob, "p", KEY, "t@0")
    with pytest.raises(CorruptEntry):
        open_record(blob, "p", None, "t@0")
    count("journal record opener, random bytes", "rejected (keyed and plain)")


def test_key_files(tmp_path):
    path = tmp_path / "k.key"
    key = create_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_key(path) == key and len(key.key_id) == 16
    with pytest.raises(BadInput, match="exists already"):
        create_key(path)
    (tmp_path / "raw.key").write_bytes(os.urandom(32))
    load_key(tmp_path / "raw.key")
    (tmp_path / "bad.key").write_bytes(b"short")
    with pytest.raises(BadInput, match="holds 5 bytes"):
        load_key(tmp_path / "bad.key")
