"""The one codec of x2x: Avro single-object encoding of journal entries, control events
and heartbeats (magic ``C3 01`` + 8-byte CRC-64-AVRO fingerprint + body).

Schemas are parsed once at import; a record whose fingerprint is not one of ours is
refused by name, so a foreign or future writer is caught before anything is applied.
"""
from __future__ import annotations

import hmac
import io
import json
from importlib import resources
from typing import Any, Callable

import fastavro
import fastavro.schema

from journal.errors import CorruptEntry, UnknownFingerprint
from journal.ops import Entry, Op, OpKind

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class _Schema:
    def __init__(self, filename: str, raw: dict[str, Any] | None = None) -> None:
        raw = raw or json.loads(resources.files(__package__).joinpath(filename).read_text())
        self.parsed = fastavro.parse_schema(raw)
        canonical = fastavro.schema.to_parsing_canonical_form(self.parsed)
        self.fingerprint = bytes.fromhex(fastavro.schema.fingerprint(canonical, "CRC-64-AVRO"))
        self.name, self.filename = raw["name"], filename


ENTRY = _Schema("entry.avsc")
CONTROL = _Schema("control.avsc")
HEARTBEAT = _Schema("heartbeat.avsc")
#: Records that carry the pair key's MAC of themselves (encoded with the field empty).
_SIGNED = (CONTROL, HEARTBEAT)


def _without_mac(current: _Schema) -> _Schema:
    """``current`` as it was before its ``mac`` field: records of the x2x before signed
    control events and heartbeats stay readable (they read with an empty MAC)."""
    raw = json.loads(resources.files(__package__).joinpath(current.filename).read_text())
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "mac"]
    return _Schema(current.filename, raw)


def _entry_without(*kinds: str) -> _Schema:
    """entry.avsc as it was before the op ``kinds`` (the enum grows only at its end, the
    fields stay): journals written by that x2x stay readable."""
    raw = json.loads(resources.files(__package__).joinpath("entry.avsc").read_text())
    kind = raw["fields"][5]["type"]["items"]["fields"][0]["type"]
    kind["symbols"] = [k for k in kind["symbols"] if k not in kinds]
    return _Schema("entry.avsc", raw)


ENTRY_V1, ENTRY_V2 = _entry_without("HASHES", "FILL"), _entry_without("FILL")
CONTROL_V1, HEARTBEAT_V1 = _without_mac(CONTROL), _without_mac(HEARTBEAT)
#: Older schemas a record may be written with, and the schema it is read as.
_OLDER = {ENTRY_V1: ENTRY, ENTRY_V2: ENTRY, CONTROL_V1: CONTROL, HEARTBEAT_V1: HEARTBEAT}
_BY_FINGERPRINT = {s.fingerprint: s for s in (ENTRY, CONTROL, HEARTBEAT, *_OLDER)}


def encode(schema: _Schema, record: dict[str, Any]) -> bytes:
    """Single-object encoding of ``record`` under ``schema``."""
    if schema in _SIGNED and not record.get("mac"):
        record = {**record, "mac": b""}
    out = io.BytesIO()
    out.write(MAGIC)
    out.write(schema.fingerprint)
    fastavro.schemaless_writer(out, schema.parsed, record)
    return out.getvalue()


def sign(schema: _Schema, data: bytes, mac: Callable[[bytes], bytes]) -> bytes:
    """``data`` (a record of ``schema`` with an empty MAC) with its MAC filled in."""
    return encode(schema, {**decode(data, schema), "mac": mac(data)})


def signed_body(schema: _Schema, data: bytes) -> tuple[bytes, bytes]:
    """The MAC a record carries and what it was computed over: the record re-encoded
    with an empty MAC (so any other spelling of the same values verifies alike)."""
    record = decode(data, schema)
    return bytes(record.get("mac") or b""), encode(schema, {**record, "mac": b""})


def verified_mac(schema: _Schema, data: bytes, mac: Callable[[bytes], bytes]) -> bytes | None:
    """The MAC ``data`` carries if it is the one ``mac`` gives (compared in constant
    time), else None: unsigned, altered, signed with another key, or not decodable."""
    try:
        carried, body = signed_body(schema, data)
    except CorruptEntry:        # UnknownFingerprint included
        return None
    return carried if carried and hmac.compare_digest(mac(body), carried) else None


def _schema_of(data: bytes, expected: _Schema) -> _Schema:
    """The schema ``data`` was written with, which must be ``expected`` or an older
    version of it (the single-object header says)."""
    if len(data) < HEADER_LEN or data[:2] != MAGIC:
        raise CorruptEntry(f"record of {len(data)} bytes is not an x2x record "
                           f"(no Avro single-object header); was it written by another tool?")
    fp = data[2:HEADER_LEN]
    schema = _BY_FINGERPRINT.get(fp)
    if schema is None:
        raise UnknownFingerprint(
            f"record has unknown schema fingerprint {fp.hex()}; it was written by another "
            f"tool or a newer x2x: upgrade x2x on this side")
    if schema is not expected and _OLDER.get(schema) is not expected:
        raise CorruptEntry(f"record is a {schema.name}, expected a {expected.name}")
    return schema


def decode(data: bytes, expected: _Schema) -> dict[str, Any]:
    """Decode a single-object-encoded record that must be of schema ``expected``."""
    schema = _schema_of(data, expected)
    try:
        # BytesIO shares a bytes object instead of copying it (a view it would copy):
        # journal records are up to a MiB each.
        body = io.BytesIO(data)
        body.seek(HEADER_LEN)
        reader = expected.parsed if schema is not expected else None
        record = fastavro.schemaless_reader(body, schema.parsed, reader)
        if body.tell() != len(data):
            raise ValueError(f"{len(data) - body.tell()} trailing bytes")
    except Exception as e:  # fastavro raises many types on garbage; all mean the same here
        raise CorruptEntry(f"{expected.name} record of {len(data)} bytes does not decode: "
                           f"{type(e).__name__}: {e}") from None
    return record


def encode_entry(entry: Entry) -> bytes:
    """One journal record (what :func:`encode` with the ENTRY schema gives)."""
    return b"".join(encode_entry_parts(entry))


def _long(out: bytearray, n: int) -> None:
    """Append an Avro long: zigzag, then 7 bits per byte, low group first."""
    n = (n << 1) ^ (n >> 63)
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


_KIND_INDEX = {OpKind(s): i for i, s in enumerate(
    ENTRY.parsed["fields"][5]["type"]["items"]["fields"][0]["type"]["symbols"])}


def encode_entry_parts(entry: Entry) -> list[bytes | memoryview]:
    """A journal record as a list of buffers whose concatenation is exactly what fastavro
    writes for it (tests/unit/test_codec.py holds the two together). Op data is referenced,
    not copied: on the capture path fastavro's copies of every payload cost more than the
    digest, and a spool can write the parts with one ``pwritev``."""
    head = bytearray(MAGIC + ENTRY.fingerprint)
    pair = entry.pair.encode()
    _long(head, len(pair))
    head += pair
    for n in (entry.epoch, entry.first_seq, entry.captured_at_ms, entry.epoch_bytes):
        _long(head, n)
    parts: list[bytes | memoryview] = []
    if entry.ops:
        _long(head, len(entry.ops))         # one block of items, as fastavro writes it
    for op in entry.ops:
        _long(head, _KIND_INDEX[op.kind])
        _long(head, op.offset)
        _long(head, op.length)
        _long(head, len(op.data))
        if len(op.data) > 256:
            parts += (head, op.data)    # framing: always a bytearray (see _canonical)
            head = bytearray()
        else:
            head += op.data
    head.append(0)                          # end of the ops array
    _long(head, len(entry.digest))
    head += entry.digest
    cipher = entry.cipher.encode()
    _long(head, len(cipher))
    head += cipher
    parts.append(head)
    return parts


#: Op kinds by enum index, for each schema an entry may be written with.
_KINDS_OF = {schema: [OpKind(k) for k in schema.parsed["fields"][5]["type"]["items"]
                      ["fields"][0]["type"]["symbols"]] for schema in (ENTRY, ENTRY_V1, ENTRY_V2)}


class _NotCanonical(ValueError):
    """Avro, but not how x2x writes it."""


def decode_entry(data: bytes) -> Entry:
    """Decode a journal record; the digest is checked by the caller, who holds the key.

    WRITE data are views into ``data``, not copies: on the applier's path a copy of
    every payload cost as much as writing it to the target. The reader is the mirror of
    :func:`encode_entry_parts`, checked against fastavro in tests/unit/test_codec.py.

    The record must be exactly how x2x encodes what it decodes to. Avro admits other
    spellings of the same values (fastavro reads a negative enum index as a Python list
    index, so a flipped bit can decode to the same op), and those are refused: then no
    altered byte of a record can pass, not even one that changes nothing."""
    schema = _schema_of(data, ENTRY)
    data = bytes(data)          # no-op for a record from Kafka; views need a fixed buffer
    try:
        entry = _read_entry(data, _KINDS_OF[schema])
    except _NotCanonical:
        entry = None
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise CorruptEntry(f"{ENTRY.name} record of {len(data)} bytes does not decode: "
                           f"{type(e).__name__}: {e}") from None
    if entry is None or not _canonical(entry, data):
        raise CorruptEntry(f"journal record of {len(data)} bytes is not encoded the way x2x "
                           f"encodes it (an altered byte that still decodes); refused")
    return entry


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long at ``pos`` and the position after it."""
    b = data[pos]
    if b < 0x80:                    # one byte: most fields of most records
        return (b >> 1) ^ -(b & 1), pos + 1
    n, shift = b & 0x7F, 7
    while True:
        pos += 1
        b = data[pos]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos + 1
        shift += 7
        if shift > 63:
            raise ValueError("a long longer than 10 bytes")


def _read_span(data: bytes, pos: int) -> tuple[int, int]:
    """Where the bytes (or string) at ``pos`` start and end."""
    n, pos = _read_long(data, pos)
    if n < 0 or pos + n > len(data):
        raise ValueError(f"a field of {n} bytes at {pos} of {len(data)}")
    return pos, pos + n


def _read_entry(data: bytes, kinds: list[OpKind]) -> Entry:
    view = memoryview(data)
    a, pos = _read_span(data, HEADER_LEN)
    pair = data[a:pos].decode()
    epoch, pos = _read_long(data, pos)
    first_seq, pos = _read_long(data, pos)
    captured_at_ms, pos = _read_long(data, pos)
    epoch_bytes, pos = _read_long(data, pos)
    count, pos = _read_long(data, pos)
    if count < 0:
        raise _NotCanonical("an array block with its size")
    ops = []
    for _ in range(count):
        k, pos = _read_long(data, pos)
        if not 0 <= k < len(kinds):
            # fastavro reads -3 as symbols[-3]: the same op, spelled otherwise
            raise (_NotCanonical if -len(kinds) <= k else ValueError)(f"op kind {k}")
        offset, pos = _read_long(data, pos)
        length, pos = _read_long(data, pos)
        a, pos = _read_span(data, pos)
        kind = kinds[k]
        ops.append(Op(kind, offset, length, view[a:pos] if kind is OpKind.WRITE
                      else data[a:pos]))
    if count:                   # then the empty block that ends the array
        if data[pos] != 0:
            raise _NotCanonical("a second array block")
        pos += 1
    a, pos = _read_span(data, pos)
    digest = data[a:pos]
    a, pos = _read_span(data, pos)
    cipher = data[a:pos].decode()
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} trailing bytes")
    return Entry(pair, epoch, first_seq, captured_at_ms, epoch_bytes, tuple(ops), digest,
                 cipher)


def _canonical(entry: Entry, data: bytes) -> bool:
    """Is ``data`` (header already checked) byte for byte the encoding of ``entry``?

    Only the framing is compared: a payload part is the very bytes the decoder read at
    that position, so once the framing before it matches, it matches too."""
    view, pos = memoryview(data), HEADER_LEN
    parts = encode_entry_parts(entry)
    parts[0] = parts[0][HEADER_LEN:]
    for part in parts:
        n = len(part)
        if isinstance(part, bytearray) and view[pos:pos + n] != part:
            return False        # framing; a decoded payload is never a bytearray
        pos += n
    return pos == len(data)
