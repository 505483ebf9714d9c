"""Applying ops to a target volume."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

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


class BackgroundWrites:
    """Applies batches of entries on a thread of its own, one batch at a time and in
    order, so the applier reads and checks the next records from the broker while a
    batch goes to disk (the write releases the interpreter lock). A failure is raised
    by the next :meth:`submit` or :meth:`wait`."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        #: Seconds callers waited for a batch to be written: the reading side had
        #: nothing to do but wait for the target's disk.
        self.waited_s = 0.0

    def submit(self, write: Callable[[list[Entry]], None], entries: list[Entry]) -> None:
        """Start ``write(entries)`` once the batch before is written (at most one is in
        flight: the staging budget then bounds memory as it would without)."""
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="x2x-apply")
        self._pending = self._pool.submit(write, entries)

    def wait(self) -> None:
        """Return once every submitted batch is written; raise what writing one raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            t0 = time.monotonic()
            try:
                pending.result()
            finally:
                self.waited_s += time.monotonic() - t0

    def discard(self) -> None:
        """Wait for the batch in flight, ignoring its failure (the caller goes back to
        its checkpoint, so what that batch reached does not matter)."""
        try:
            self.wait()
        except Exception:       # noqa: BLE001 -- any failure: its writes are redone
            pass

    def close(self) -> None:
        """Wait for the batch in flight (its failure ignored) and end the thread."""
        self.discard()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
