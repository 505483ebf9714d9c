"""The live baseline: publish every block of the source while clients keep writing to it.

Non-zero blocks go out as WRITE ops and zero runs as ZERO ops (the same run coalescing as
the scan capturer), one lock region at a time (producers/regions.py). Each region is read
and appended while holding that region's range lock, the same lock a client write to
those blocks takes across "local write + append", so a baseline op never lands in the
journal after a newer write to the same block (journal/DESIGN.md rule 7). A FLUSH ends
the baseline: from that consistency point on the target holds the whole source.

The block hash map is filled on the way (hashing happens outside the lock); blocks
written later are only marked dirty on the write path and re-hashed at a clean stop
(:func:`refresh_hashes`), so hashing never slows a client write.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from infra.volume import Volume
from journal.blocks import HASH_LEN, block_count, hash_block, zero_hashes_over
from producers.journaling import RangeLocks
from producers.publisher import JournalPublisher
from producers.regions import journal_regions


@dataclass
class BaselineProgress:
    """How far the baseline got; read by the heartbeat loop while the baseline runs."""

    total: int
    done: int = 0
    blocks_sent: int = 0        # non-zero blocks sent as WRITE
    finished: bool = False
    flush_seq: int = 0          # seq of the FLUSH that ended it
    seconds: float = 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


def new_hash_map(volume_size: int, block_size: int) -> bytearray:
    return bytearray(block_count(volume_size, block_size) * HASH_LEN)


def run_baseline(vol: Volume, pub: JournalPublisher, locks: RangeLocks, block_size: int,
                 hashes: bytearray, progress: BaselineProgress,
                 stop: threading.Event | None = None) -> bool:
    """Journal every block of ``vol`` in the publisher's epoch, ending with a FLUSH.

    Returns False if ``stop`` was set before the end (the baseline is then incomplete and
    the target is not a copy of the source: the next start must begin a new epoch).
    """
    t0 = time.monotonic()

    def hash_piece(base: int, view: memoryview, written: list[int]) -> None:
        # The buffer still holds what was journaled; hash it without holding up writers.
        # A write that came in meanwhile marked its blocks dirty, to be re-hashed later.
        # Every block not written is zeros: the piece's slice of the map is set to zero
        # hashes at once, then the written blocks' own hashes go over it.
        zero_hashes_over(hashes, base, len(view), block_size)
        first = base // block_size
        for off in written:
            index = first + off // block_size
            hashes[index * HASH_LEN:(index + 1) * HASH_LEN] = hash_block(
                view[off:off + block_size])
        progress.blocks_sent += len(written)
        progress.done += len(view)

    if not journal_regions(vol, pub, locks, block_size, [(0, vol.size)], hash_piece, stop):
        return False
    progress.flush_seq = pub.flush_point()
    progress.finished = True
    progress.seconds = time.monotonic() - t0
    return True


def refresh_hashes(vol: Volume, hashes: bytearray, dirty: bytearray, block_size: int) -> int:
    """Re-hash the blocks marked in ``dirty`` (one byte per block) and clear the marks;
    returns how many were re-hashed. Call when no client can write."""
    buf = bytearray(block_size)
    count = 0
    index = dirty.find(1)
    while index >= 0:
        offset = index * block_size
        view = memoryview(buf)[:min(block_size, vol.size - offset)]
        vol.readinto(offset, view)
        hashes[index * HASH_LEN:(index + 1) * HASH_LEN] = hash_block(view)
        dirty[index] = 0
        count += 1
        index = dirty.find(1, index + 1)
    return count
