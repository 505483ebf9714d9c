"""Journal the current content of the source, one lock region at a time.

The one loop behind the live baseline (producers/baseline.py), the resend of marked
extents (producers/recovery.py) and the resend a resync asks for (producers/resync.py):
each piece is read and its WRITE/ZERO ops appended while its range lock is held, the lock
a client write takes across "local write + append", so what is journaled here never
lands after a newer write to the same block (journal/DESIGN.md rule 7).

A piece never crosses a lock region, so it holds exactly one stripe, and one buffer of a
region serves every piece: the ops point into it until their run is closed, which
happens before the lock is released and before the buffer is read into again.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

from infra.volume import Volume
from journal.blocks import block_spans
from journal.runs import RunBuilder, max_write
from producers.journaling import RangeLocks
from producers.publisher import JournalPublisher

#: Called once a piece's lock is released: (offset of the piece, what was read and
#: journaled, offsets inside it of the blocks that went as WRITE or FILL; every other
#: block is zeros). The view is valid until the call returns (the next piece is read
#: into the same buffer).
AfterPiece = Callable[[int, memoryview, list[int]], None]


def journal_regions(vol: Volume, pub: JournalPublisher, locks: RangeLocks, block_size: int,
                    spans: Iterable[tuple[int, int]], after: AfterPiece | None = None,
                    stop: threading.Event | None = None) -> bool:
    """Append WRITE ops (ZERO for zero blocks) holding the current content of ``spans``
    (offset, length) to ``pub``, one lock region at a time; no FLUSH (the caller ends
    with one). Returns False if ``stop`` was set before the end."""
    region = locks.region
    if region % block_size:
        raise ValueError(f"lock region {region} is not a multiple of block size {block_size}")
    runs = RunBuilder(max_write(block_size))
    buf = bytearray(region)
    for offset, length in spans:
        pos, end = offset, offset + length
        while pos < end:
            if stop is not None and stop.is_set():
                return False
            view = memoryview(buf)[:min(end, (pos // region + 1) * region) - pos]
            written: list[int] = []
            with locks.hold(pos, len(view)):
                holes = vol.stream_into(pos, view)
                for off, n, hole in block_spans(len(view), block_size, holes):
                    if hole:
                        pub.append_many(runs.add_zero(pos + off, n))
                        continue
                    ops, data = runs.add_block(pos + off, view[off:off + n])
                    pub.append_many(ops)
                    if data:
                        written.append(off)
                # The run's blocks point into ``buf``: close it before the lock is
                # released and before the buffer is reused.
                pub.append_many(runs.finish())
            if after is not None:
                after(pos, view, written)
            pos += len(view)
    return True
