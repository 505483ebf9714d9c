"""Sequence and epoch rules: which entry may be applied next, and what the applier refuses."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from journal.errors import ExtentOutOfRange, SeqGap, StaleEpoch
from journal.ops import CHANGING_KINDS, Entry, OpKind


@dataclass(frozen=True, slots=True)
class Position:
    """Where a replica stands: the last op applied, and the record that carried it."""

    epoch: int = 0
    seq: int = 0
    offset: int = -1          # Kafka offset of the record holding ``seq``; -1: nothing yet
    epoch_bytes: int = 0
    captured_at_ms: int = 0

    def after(self, entry: Entry, offset: int) -> "Position":
        return Position(entry.epoch, entry.last_seq, offset, entry.epoch_bytes,
                        entry.captured_at_ms)


class Verdict(enum.Enum):
    APPLY = "apply"
    DUPLICATE = "duplicate"   # already applied: replay is idempotent, skip it


def classify(pos: Position, entry: Entry) -> Verdict:
    """Decide whether ``entry`` is next after ``pos``; raise if it can never be.

    Seqs are contiguous inside an epoch and start at 1; a new epoch (baseline, resync,
    change of direction) starts again at 1 and may follow any point of an older one.
    """
    if entry.epoch < pos.epoch:
        raise StaleEpoch(
            f"pair {entry.pair}: entry of epoch {entry.epoch} (seq {entry.first_seq}) arrived "
            f"after epoch {pos.epoch}; an old capturer may still be publishing. Stop it, then "
            f"restart the applier")
    if entry.epoch > pos.epoch:
        if entry.first_seq != 1:
            raise SeqGap(
                f"pair {entry.pair}: epoch {entry.epoch} starts at seq {entry.first_seq}, "
                f"expected 1; the start of the epoch is missing from the journal. "
                f"Resync the pair (x2x capture {entry.pair} --once restarts a baseline)")
        return Verdict.APPLY
    if entry.last_seq <= pos.seq:
        return Verdict.DUPLICATE
    if entry.first_seq != pos.seq + 1:
        raise SeqGap(
            f"pair {entry.pair}: epoch {entry.epoch} jumps from seq {pos.seq} to "
            f"{entry.first_seq}; ops {pos.seq + 1}..{entry.first_seq - 1} are missing. "
            f"Resync the pair")
    return Verdict.APPLY


def check_extents(entry: Entry, volume_size: int) -> None:
    """Refuse an entry any of whose ops reaches outside a target of ``volume_size`` bytes."""
    seq = entry.first_seq
    for op in entry.ops:
        if op.kind in CHANGING_KINDS or op.kind is OpKind.HASHES:
            if op.offset < 0 or op.length < 0 or op.offset + op.length > volume_size:
                raise ExtentOutOfRange(
                    f"pair {entry.pair}: op seq {seq} ({op.kind.value} offset {op.offset} "
                    f"length {op.length}) lies outside the target of {volume_size} bytes; "
                    f"the target is too small or the journal belongs to another volume")
            if op.kind is OpKind.WRITE and len(op.data) != op.length:
                raise ExtentOutOfRange(
                    f"pair {entry.pair}: op seq {seq} says length {op.length} but carries "
                    f"{len(op.data)} bytes")
            if op.kind is OpKind.FILL and len(op.data) != 1:
                raise ExtentOutOfRange(
                    f"pair {entry.pair}: op seq {seq} is a FILL carrying {len(op.data)} "
                    f"bytes, not the one byte it repeats")
        seq += 1


@dataclass(frozen=True, slots=True)
class Limit:
    """Where a point-in-time replica stops: the last consistency point at or before a
    capture time, an ``(epoch, seq)`` or a topic offset (any that are set)."""

    at_ms: int | None = None
    epoch_seq: tuple[int, int] | None = None
    offset: int | None = None

    def exceeded_by(self, entry: Entry, offset: int) -> bool:
        """True when ``entry`` lies (even in part) beyond the limit."""
        if self.at_ms is not None and entry.captured_at_ms > self.at_ms:
            return True
        if self.epoch_seq is not None and (entry.epoch, entry.last_seq) > self.epoch_seq:
            return True
        return self.offset is not None and offset > self.offset

    def precedes(self, pos: Position) -> bool:
        """True when the limit lies before ``pos``: a target already at ``pos`` (seeded
        from the history base) cannot be brought back to it."""
        if self.at_ms is not None and self.at_ms < pos.captured_at_ms:
            return True
        if self.epoch_seq is not None and self.epoch_seq < (pos.epoch, pos.seq):
            return True
        return self.offset is not None and self.offset < pos.offset
