"""Writes journaled from the source itself: the async capturer's cheapest backlog.

In async mode a client's write is acknowledged once it is on the source, and the journal
follows. The bytes of that write are on the source already, so instead of keeping a copy
(in memory, or in the disk spool) until the broker can take them, the op carries a
:class:`SourceBytes`: a promise to read them from the source when the journal writer
gets to the op. A burst of writes then costs what serving it costs, and the journal
catches up after it at the broker's pace.

The promise holds because whoever changes those bytes first reads them: a client write,
zero or trim calls :meth:`DeferredWrites.read_overlapping` under its range lock, before
its local write, so a deferred op that was overtaken carries the bytes it wrote, not the
newer ones (journal/DESIGN.md rule 11). Every deferred op is registered under the same
range lock as the write it stands for, so the next writer of those blocks sees it.

Burst absorption: while clients keep writing, the publisher leaves such a burst on the
source for up to ``X2X_ASYNC_HOLD`` seconds (default 2; 0 ships at once) instead of
shipping it alongside: on a small machine the journal and a local broker would otherwise
take a third of the CPU the clients need. A FLUSH, a drain or a stop ships at once, and a
longer burst ships as it ages, so the hold adds at most that much to the RPO, and only
while clients write without flushing: for ``X2X_ASYNC_HOLD`` seconds after a client's
FLUSH nothing is held (a client that flushes makes its own consistency points).

Bounded: the publisher defers only while its backlog (deferred + spooled) fits the spool
cap; bytes read early are counted in its memory bound like any other queued payload.
A crash loses nothing that matters: the blocks stay marked in the write-intent bitmap
until a FLUSH after them is acknowledged, and the restart resends them.
"""
from __future__ import annotations

import os
import threading
from typing import Callable

from infra.volume import Volume
from journal.errors import BadInput
from journal.ops import Deferred

#: Index granularity: a deferred op is filed under every grain it touches.
GRAIN = 128 << 10
#: Default of ``X2X_ASYNC_HOLD``: seconds a burst may stay on the source while clients write.
DEFAULT_HOLD = 2.0


def hold_from_env() -> float:
    """``X2X_ASYNC_HOLD`` in seconds (default 2; 0: ship every write at once)."""
    raw = os.environ.get("X2X_ASYNC_HOLD")
    if raw is None or not raw.strip():
        return DEFAULT_HOLD
    try:
        value = float(raw.strip().removesuffix("s"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise BadInput(f"X2X_ASYNC_HOLD={raw!r} is invalid: give seconds from 0 to 3600, "
                       f"e.g. 2 or 0.5 (0 ships every write at once)")
    return value


class SourceBytes(Deferred):
    """``length`` bytes at ``offset`` of the source, as the write that made them left
    them; read by the journal writer (:meth:`take`) or, first, by the next change."""

    __slots__ = ("offset", "length", "_index", "_on_early", "_lock", "_data", "_early")

    def __init__(self, index: "DeferredWrites", offset: int, length: int,
                 on_early: Callable[[int], None]) -> None:
        self.offset, self.length = offset, length
        self._index, self._on_early = index, on_early
        self._lock = threading.Lock()
        self._data: bytes | None = None
        self._early = False

    def __len__(self) -> int:
        return self.length

    @property
    def early(self) -> bool:
        return self._early

    def take(self) -> bytes:
        with self._lock:
            if self._data is None:
                self._data = self._read()
            return self._data

    def read_early(self) -> None:
        """Read the bytes now, because they are about to change (range lock held)."""
        with self._lock:
            if self._data is None:
                self._data = self._read()
                self._early = True
                self._on_early(self.length)     # now held in memory: the publisher counts it

    def _read(self) -> bytes:
        data = self._index.vol.pread(self.offset, self.length)
        self._index.forget(self)
        return data


class DeferredWrites:
    """The deferred ops not read yet, filed by the grains of the source they cover."""

    def __init__(self, vol: Volume, grain: int = GRAIN) -> None:
        self.vol, self.grain = vol, grain
        self._lock = threading.Lock()
        self._by_grain: dict[int, set[SourceBytes]] = {}

    def defer(self, offset: int, length: int, piece: int,
              on_early: Callable[[int], None]) -> list[SourceBytes]:
        """Promises for the bytes of a write just made at ``offset``, each at most
        ``piece`` bytes (what one op carries). Call under the write's range lock."""
        out = [SourceBytes(self, o, min(piece, offset + length - o), on_early)
               for o in range(offset, offset + length, piece)]
        with self._lock:
            for s in out:
                for g in self._grains(s.offset, s.length):
                    self._by_grain.setdefault(g, set()).add(s)
        return out

    def read_overlapping(self, offset: int, length: int) -> None:
        """Read every deferred op that ``[offset, offset + length)`` is about to change.
        Call under that range's lock, before changing the source."""
        if not self._by_grain:
            # Anything deferred that overlaps was filed under the same range lock, so
            # an empty index, read without the lock, is the common case's quick answer.
            return
        end = offset + length
        with self._lock:
            hit = {s for g in self._grains(offset, length) for s in self._by_grain.get(g, ())
                   if s.offset < end and offset < s.offset + s.length}
        for s in hit:
            s.read_early()

    def forget(self, s: SourceBytes) -> None:
        with self._lock:
            for g in self._grains(s.offset, s.length):
                filed = self._by_grain.get(g)
                if filed is not None:
                    filed.discard(s)
                    if not filed:
                        del self._by_grain[g]

    def clear(self) -> None:
        """Drop every promise (their journal is gone: its publisher failed or closed)."""
        with self._lock:
            self._by_grain.clear()

    def __len__(self) -> int:
        with self._lock:
            return len({s for filed in self._by_grain.values() for s in filed})

    def _grains(self, offset: int, length: int) -> range:
        return range(offset // self.grain, (offset + max(length, 1) - 1) // self.grain + 1)
