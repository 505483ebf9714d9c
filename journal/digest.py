"""The entry digest: blake3 over everything an entry says, so a flipped bit is caught."""
from __future__ import annotations

import struct

import blake3

from journal.ops import Entry, Op, OpKind

_KIND_CODE = {kind: i for i, kind in enumerate(OpKind)}
_HEADER = struct.Struct("<qqqq")        # epoch, first_seq, captured_at_ms, epoch_bytes
_OP_HEADER = struct.Struct("<Bqqq")     # kind, offset, length, len(data)


def entry_digest(pair: str, epoch: int, first_seq: int, captured_at_ms: int,
                 epoch_bytes: int, ops: tuple[Op, ...], key: bytes | None = None) -> bytes:
    """Digest of an entry's content; keyed (a MAC) when ``key`` is given."""
    h = blake3.blake3(key=key) if key else blake3.blake3()
    name = pair.encode()
    h.update(struct.pack("<I", len(name)))
    h.update(name)
    h.update(_HEADER.pack(epoch, first_seq, captured_at_ms, epoch_bytes))
    for op in ops:
        h.update(_OP_HEADER.pack(_KIND_CODE[op.kind], op.offset, op.length, len(op.data)))
        if op.data:
            h.update(op.data)
    return h.digest()


def digest_of(entry: Entry, key: bytes | None = None) -> bytes:
    """Digest of ``entry`` as it stands (ignoring its ``digest`` field)."""
    return entry_digest(entry.pair, entry.epoch, entry.first_seq, entry.captured_at_ms,
                        entry.epoch_bytes, entry.ops, key)
