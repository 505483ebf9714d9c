"""How the trace capturer resumes after an unclean stop with a hash compare, not a baseline.

A killed capturer traced nothing until its restart, so the device must be compared with
what the target holds. The target holds, for every block, what the journal held for it
at some consistency point the broker acknowledged, or something appended after it. Two
files in the capturer's state directory keep exactly that:

* ``trace.map``: the journaled map (blake3 per block, producers/trace.py) as it was at a
  cut whose FLUSH the broker acknowledged (saved at most every ``SNAPSHOT_EVERY``
  seconds), with ``trace.json`` saying which volume, block size and boot.
  No copy of the map is taken at the FLUSH (a GiB at 2 TiB, while the filesystem is
  frozen): once the FLUSH is acknowledged, the live map is saved. It differs from the
  map at the FLUSH only in blocks appended after it, whose bits stay set, so their
  hashes in the file are never believed. Saved whole (atomically) the first time, then
  in place, only where bits are set: every entry that differs from the file has its
  bit set until the write is durable, so a kill half-way leaves torn entries only
  where the bits say not to believe them;
* ``trace.touched``: one byte per block, memory-mapped ``MAP_SHARED``, set *before* a
  block is appended, and cleared only once a newer map that covers the block is saved:
  bits of blocks appended after that map's FLUSH stay set. A clear is a copy that only
  turns bytes from 1 to 0, so a capturer killed half-way leaves a superset.

At an unclean start (same boot: the bits live in the page cache, which a process's death
does not touch but a machine's does), the map is loaded with every touched block's hash
made impossible: the compare then sends every block that differs from the map and every
block that may have been appended after it, whatever its content (the target may hold
a later version than the map). Another boot, sizes that differ, no map: a baseline.
"""
from __future__ import annotations

import mmap
import os
import re
from pathlib import Path
from typing import Iterator

from infra.files import atomic_write, read_json, read_whole, write_json
from journal.blocks import HASH_LEN
from producers.intent import boot_id

SNAPSHOT_EVERY = 30.0
_UNKNOWN = b"\xff" * HASH_LEN      # no block hashes to this (as good as a blake3 gets)


class ResumePoint:
    """The two files above, for one capturer state directory."""

    def __init__(self, directory: Path, block_size: int, volume_size: int) -> None:
        self.map_path = directory / "trace.map"
        self.meta_path = directory / "trace.json"
        self.block_size, self.volume_size = block_size, volume_size
        self.blocks = -(-volume_size // block_size)
        path = directory / "trace.touched"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != self.blocks:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, max(self.blocks, 1))
                self._fresh = True
            else:
                self._fresh = False
            self.bits = mmap.mmap(fd, max(self.blocks, 1), mmap.MAP_SHARED)
        finally:
            os.close(fd)
        #: The sequence number of the FLUSH whose map waits for the broker's
        #: acknowledgement (None: no map waits).
        self.pending: int | None = None
        #: One byte per block appended since that FLUSH: their bits must survive the
        #: commit (a byte a block, like the bits; a set grew without bound while the
        #: broker was away).
        self._since = bytearray(max(self.blocks, 1))
        #: Has this run saved the map whole? Later saves then write in place.
        self._whole = False

    def load(self) -> bytearray | None:
        """The saved map with touched blocks made unknown, or None where unusable."""
        meta = read_json(self.meta_path)
        if (self._fresh or not meta or meta.get("boot_id") != boot_id().decode()
                or meta.get("block_size") != self.block_size
                or meta.get("volume_size") != self.volume_size):
            return None
        saved = read_whole(self.map_path)
        if saved is None or len(saved) != self.blocks * HASH_LEN:
            return None
        for first, end in _runs(self.bits, 1):
            saved[first * HASH_LEN:end * HASH_LEN] = _UNKNOWN * (end - first)
        return saved

    def touch(self, index: int) -> None:
        """Before block ``index`` is appended."""
        self.bits[index] = 1
        if self.pending is not None:
            self._since[index] = 1

    def save(self, hashes: bytes | bytearray) -> None:
        """Save ``hashes`` as the map now (every op before is acknowledged, or the map is
        the one the run started from); the bits stay as they are."""
        atomic_write(self.map_path, hashes)       # as given: nobody changes it meanwhile
        write_json(self.meta_path, {"boot_id": boot_id().decode(),
                                    "block_size": self.block_size,
                                    "volume_size": self.volume_size})
        self._whole = True

    def _save_touched(self, hashes: bytearray) -> None:
        """Write the entries of ``hashes`` whose bits are set over the saved map, in
        place, and make them durable (runs closer than a page of the map go as one)."""
        fd = os.open(self.map_path, os.O_WRONLY | os.O_CLOEXEC)
        view = memoryview(hashes)
        try:
            for first, end in _runs(self.bits, _MERGE_GAP):
                a, b = first * HASH_LEN, end * HASH_LEN
                while a < b:
                    a += os.pwrite(fd, view[a:b], a)
            os.fsync(fd)
        finally:
            view.release()
            os.close(fd)

    def snapshot(self, flush_seq: int) -> None:
        """At a cut, right after its FLUSH was appended (one pending at a time)."""
        if self.pending is None:
            self.pending = flush_seq

    def commit_if_acked(self, acked_seq: int, hashes: bytearray) -> bool:
        """Once the pending FLUSH is acknowledged, save the live map ``hashes`` and clear
        the bits of every block not appended since that FLUSH."""
        if self.pending is None or acked_seq < self.pending:
            return False
        try:
            if self._whole:
                self._save_touched(hashes)
            else:
                self.save(hashes)
        except FileNotFoundError:       # the files were forgotten meanwhile (a failback)
            self.save(hashes)
        self.bits[:] = self._since   # 1 -> 0 only: a kill half-way leaves a superset
        self._since[:] = bytes(len(self._since))
        self.pending = None
        return True

    def clear(self) -> None:
        """After a clean stop (everything acknowledged; the state store has the map)."""
        self.pending = None
        self.bits[:] = bytes(len(self.bits))
        self._since[:] = bytes(len(self._since))

    def close(self) -> None:
        self.bits.close()


#: Set bits at most this many blocks apart are saved as one run (one page of the map).
_MERGE_GAP = 4096 // HASH_LEN


def _runs(bits: bytes | mmap.mmap, gap: int) -> Iterator[tuple[int, int]]:
    """The set bits as ``(first, end)`` block runs, runs less than ``gap`` apart joined."""
    first = end = -1
    for m in re.finditer(rb"\x01+", bits):
        if first >= 0 and m.start() - end >= gap:
            yield first, end
            first = -1
        if first < 0:
            first = m.start()
        end = m.end()
    if first >= 0:
        yield first, end


def forget(directory: Path) -> None:
    """``capture --rebaseline``: no resume from these files."""
    for name in ("trace.map", "trace.json", "trace.touched"):
        (directory / name).unlink(missing_ok=True)
