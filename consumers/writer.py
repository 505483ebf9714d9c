"""Applying ops to a target volume."""
from __future__ import annotations

from infra.volume import Volume
from journal.ops import Entry, Op, OpKind


def apply_entry(vol: Volume, entry: Entry) -> None:
    """Apply every op of a validated entry; TRIM reads back as zeros, like the source."""
    for op in entry.ops:
        apply_op(vol, op)


def apply_op(vol: Volume, op: Op) -> None:
    if op.kind is OpKind.WRITE:
        vol.pwrite(op.offset, op.data)
    elif op.kind in (OpKind.ZERO, OpKind.TRIM):
        vol.zero(op.offset, op.length)
    # FLUSH and SEAL change no bytes: the applier fsyncs and checkpoints at them;
    # HASHES change none either: the applier compares the target against them.
