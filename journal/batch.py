"""Grouping ops into entries: seq numbering, payload budget, consistency-point closing,
and coalescing closed entries that wait together into one record."""
from __future__ import annotations

from dataclasses import dataclass, field

from journal.digest import entry_digest
from journal.ops import CLOSING_KINDS, Deferred, Entry, Op, OpKind

#: Kinds an entry may hold and still be coalesced with its neighbours: a SEAL, a
#: HASHES (compared at its own entry's point) and a group barrier stay records of
#: their own.
_PLAIN_KINDS = frozenset({OpKind.WRITE, OpKind.ZERO, OpKind.TRIM, OpKind.FILL,
                          OpKind.FLUSH})

#: Payload bytes per Kafka record. Kept under a stock Kafka broker's message.max.bytes
#: (1 MiB) with room for Avro framing and compression expansion of random data.
DEFAULT_BUDGET = 960 * 1024
#: What an op costs in a record besides its data (Avro header fields, rounded up).
OP_OVERHEAD = 32


@dataclass
class Sequencer:
    """Numbers ops within an epoch and packs them into entries of at most ``budget`` bytes.

    A FLUSH or SEAL always ends its entry, so every consistency point is an entry boundary.
    With ``sign`` off, entries come without their digest: the caller signs them later
    (the publisher does it on its writer thread, off the capture path).
    """

    pair: str
    epoch: int
    next_seq: int = 1
    epoch_bytes: int = 0
    budget: int = DEFAULT_BUDGET
    key: bytes | None = None
    sign: bool = True
    _ops: list[Op] = field(default_factory=list)
    _size: int = 0

    @property
    def pending_ops(self) -> int:
        return len(self._ops)

    @property
    def max_op_data(self) -> int:
        """The most data one op can carry; larger WRITEs are split into ops this big."""
        return self.budget - OP_OVERHEAD

    def add(self, op: Op, now_ms: int) -> list[Entry]:
        """Queue ``op``; return the entries it completed (possibly none)."""
        out: list[Entry] = []
        for piece in self._split(op):
            cost = len(piece.data) + OP_OVERHEAD
            if self._ops and self._size + cost > self.budget:
                out.append(self._close(now_ms))
            self._ops.append(piece)
            self._size += cost
            if piece.kind in CLOSING_KINDS:
                out.append(self._close(now_ms))
        return out

    def close(self, now_ms: int) -> Entry | None:
        """Emit whatever is queued as an entry (e.g. before a pause in the workload)."""
        return self._close(now_ms) if self._ops else None

    def _split(self, op: Op) -> list[Op]:
        room = self.max_op_data
        if op.kind is not OpKind.WRITE or len(op.data) <= room:
            return [op]
        if isinstance(op.data, Deferred):
            # Bytes not read yet cannot be sliced; their maker cuts them to size.
            raise ValueError(f"a deferred WRITE of {len(op.data)} bytes exceeds the "
                             f"{room} bytes one op can carry")
        # Views, not copies: an op's data is never changed once the op exists.
        data = memoryview(op.data)
        return [Op.write(op.offset + i, data[i:i + room]) for i in range(0, len(data), room)]

    def _close(self, now_ms: int) -> Entry:
        ops = tuple(self._ops)
        self.epoch_bytes += sum(op.payload_bytes for op in ops)
        digest = (entry_digest(self.pair, self.epoch, self.next_seq, now_ms,
                               self.epoch_bytes, ops, self.key) if self.sign else b"")
        entry = Entry(self.pair, self.epoch, self.next_seq, now_ms, self.epoch_bytes, ops,
                      digest)
        self.next_seq += len(ops)
        self._ops, self._size = [], 0
        return entry


def plain_entry(entry: Entry) -> bool:
    """May ``entry`` share a record? Only data ops and plain FLUSHes (no group barrier)."""
    return all(op.kind in _PLAIN_KINDS and (op.kind is not OpKind.FLUSH or op.offset == 0)
               for op in entry.ops)


def joinable(entries: list[Entry], budget: int = DEFAULT_BUDGET) -> int:
    """How many of ``entries`` (closed, unsigned, contiguous, oldest first) go into one
    record: a run of plain entries of one epoch within ``budget``, cut back to the last
    one that ends at a consistency point if any does (journal/DESIGN.md rule 2). At
    least 1."""
    if len(entries) < 2 or not plain_entry(entries[0]):
        return 1
    size, ends_point, count = 0, 0, 0
    for entry in entries:
        if entry.epoch != entries[0].epoch or not plain_entry(entry):
            break
        size += sum(len(op.data) for op in entry.ops) + OP_OVERHEAD * len(entry.ops)
        if count and size > budget:
            break
        count += 1
        if entry.closes_consistency_point:
            ends_point = count
    return ends_point or count


def join_entries(entries: list[Entry]) -> Entry:
    """One entry holding the ops of ``entries`` (as :func:`joinable` chose them, not
    yet signed): it covers their seqs and bytes and was closed when the last one was."""
    if len(entries) == 1:
        return entries[0]
    first, last = entries[0], entries[-1]
    ops = tuple(op for entry in entries for op in entry.ops)
    return Entry(first.pair, first.epoch, first.first_seq, last.captured_at_ms,
                 last.epoch_bytes, ops)
