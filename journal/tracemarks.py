"""Trace capture's pure logic: completed writes from block tracepoints -> dirty blocks.

The trace capturer (producers/trace.py) reads the text of a private tracefs instance
(infra/tracefs.py) where ``block:block_rq_complete`` (and ``block_bio_complete``, for
bio-based devices such as device-mapper) report every completed request of one device.
Here, without any I/O:

* :func:`parse_changes` turns that text into byte extents that changed (writes,
  discards, write-zeroes: anything but a read or an empty flush);
* :class:`DirtyBlocks` keeps the blocks changed since they were last read, and hands
  them out coalesced into extents;
* :class:`FreezeTimes` keeps the freeze durations of consistency cuts (p50/p99/max).

Rule 16 of journal/DESIGN.md says what a cut of trace capture promises.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator

from journal.blocks import Extent, coalesce

SECTOR = 512
#: ``block_rq_complete: 7,0 WS () 123456 + 8 be,0,4 [0]`` and
#: ``block_bio_complete: 7,0 WS 123456 + 8 [0]`` (rwbs, sector, sectors).
_EVENT = re.compile(rb"block_(?:rq|bio)_complete: \d+,\d+ ([A-Z]*) (?:\([^)]*\) )?"
                    rb"(\d+) \+ (\d+)")


def parse_changes(text: bytes) -> Iterator[tuple[int, int]]:
    """(byte offset, byte length) of each completed request in ``text`` that changed the
    device. rwbs has W (write), D (discard) or N (write-zeroes and other non-read ops);
    R is a read, a bare F an empty flush (no sectors)."""
    for m in _EVENT.finditer(text):
        rwbs, sectors = m.group(1), int(m.group(3))
        if sectors and (b"W" in rwbs or b"D" in rwbs or b"N" in rwbs):
            yield int(m.group(2)) * SECTOR, sectors * SECTOR


def split_lines(pending: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """Whole lines of ``pending + chunk``, and the unfinished tail kept for next time."""
    data = pending + chunk
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]


@dataclass
class DirtyBlocks:
    """Blocks of a volume changed since they were last read (one owner: the capturer).

    Marking is per request (a few blocks), never per byte; :meth:`take` empties the set
    and returns it as sorted extents of at most ``max_extent`` bytes."""

    block_size: int
    volume_size: int
    max_extent: int = 8 << 20
    _blocks: set[int] = field(default_factory=set)

    def mark(self, offset: int, length: int) -> None:
        """Mark the blocks of ``[offset, offset + length)`` (clipped to the volume: a
        partition's view of requests to its whole disk)."""
        end = min(offset + length, self.volume_size)
        offset = max(offset, 0)
        if offset >= end:
            return
        self._blocks.update(range(offset // self.block_size,
                                  (end - 1) // self.block_size + 1))

    def mark_all(self) -> None:
        self.mark(0, self.volume_size)

    def take(self) -> list[Extent]:
        """The marked blocks as extents, and the set emptied."""
        blocks, self._blocks = sorted(self._blocks), set()
        return list(coalesce(blocks, self.block_size, self.volume_size, self.max_extent))

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.block_size

    def __len__(self) -> int:
        return len(self._blocks)


@dataclass
class FreezeTimes:
    """Freeze durations of the cuts, in seconds; the last ``keep`` for percentiles, the
    maximum and counts over the whole run."""

    keep: int = 1000
    times: list[float] = field(default_factory=list)
    max: float = 0.0
    cuts: int = 0
    abandoned: int = 0

    def add(self, seconds: float, abandoned: bool = False) -> None:
        self.times.append(seconds)
        del self.times[:-self.keep]
        self.max = max(self.max, seconds)
        self.cuts += 1
        self.abandoned += abandoned

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (nearest rank) of the kept durations; 0 with none."""
        if not self.times:
            return 0.0
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]

    def detail(self) -> dict[str, str]:
        """The heartbeat's freeze figures (milliseconds)."""
        return {"cuts": str(self.cuts), "cuts_abandoned": str(self.abandoned),
                "freeze_p50_ms": f"{self.percentile(50) * 1000:.1f}",
                "freeze_p99_ms": f"{self.percentile(99) * 1000:.1f}",
                "freeze_max_ms": f"{self.max * 1000:.1f}"}
