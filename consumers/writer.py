"""Applying ops to a target volume."""
from __future__ import annotations

from typing import Iterable

from infra.volume import Volume
from journal.ops import Entry, Op, OpKind


def apply_entries(vol: Volume, entries: Iterable[Entry]) -> None:
    """Apply every op of validated entries, in order; TRIM reads back as zeros, like the
    source. WRITEs that continue one another go down as one run (:meth:`Volume.pwritev`):
    a replay or a baseline is a stream of adjacent ops, one system call per run instead
    of per op. Only adjacent ops join a run, and a run is written before any other op,
    so the order of ops that touch the same bytes is kept."""
    start = end = 0
    parts: list[bytes | memoryview] = []
    for entry in entries:
        for op in entry.ops:
            if op.kind is OpKind.WRITE and parts and op.offset == end:
                parts.append(op.data)       # type: ignore[arg-type]  # resolved, never Deferred
                end += op.length
                continue
            if parts:
                vol.pwritev(start, parts)
                parts = []
            if op.kind is OpKind.WRITE:
                start, end, parts = op.offset, op.offset + op.length, [op.data]  # type: ignore[list-item]
            else:
                apply_op(vol, op)
    if parts:
        vol.pwritev(start, parts)


def apply_op(vol: Volume, op: Op) -> None:
    if op.kind is OpKind.WRITE:
        vol.pwrite(op.offset, op.data)
    elif op.kind in (OpKind.ZERO, OpKind.TRIM):
        vol.zero(op.offset, op.length)
    elif op.kind is OpKind.FILL:
        vol.fill(op.offset, op.length, op.data[0])  # type: ignore[index]  # checked: one byte
    # FLUSH and SEAL change no bytes: the applier fsyncs and checkpoints at them;
    # HASHES change none either: the applier compares the target against them.
