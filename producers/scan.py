"""The scan capturer: changed-block tracking by blake3 hash map.

The first run publishes a baseline (non-zero blocks as WRITE, zero runs as ZERO); later
runs publish only blocks whose hash changed since the last complete scan. Each scan ends
with a FLUSH, so the target is consistent after each one as far as the source was quiet
while it was read (the scan capturer has no view of writes in flight: use the NBD
capturer for live workloads).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from infra.kafka import KafkaSettings
from infra.volume import Volume
from infra.volumes import open_volume
from journal.blocks import (HASH_LEN, block_count, block_spans, diff_maps, hash_block,
                            zero_hashes_over)
from journal.errors import VolumeError
from journal.pairs import PairSpec
from journal.rates import LinkLimit
from journal.runs import RunBuilder, max_write as write_bound
from producers.announce import announce_baseline
from producers.publisher import JournalPublisher
from producers.rate import TokenBucket
from producers.state import CaptureState, StateStore, plan_start
from schemas.cipher import JournalKey

CHUNK = 8 << 20
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ScanResult:
    epoch: int
    first_seq: int
    last_seq: int
    baseline: bool
    blocks_scanned: int
    blocks_changed: int
    bytes_changed: int       # payload bytes the ops carry or zero
    bytes_sent: int          # record bytes handed to Kafka
    seconds: float


def scan_once(spec: PairSpec, settings: KafkaSettings, store: StateStore | None = None,
              progress: Progress | None = None, key: JournalKey | None = None,
              link: LinkLimit | None = None) -> ScanResult:
    """Scan the source once and journal what changed, ending with a FLUSH; at most at
    the pair's ``link`` rate (journal/rates.py)."""
    store = store or StateStore(spec.name)
    t0 = time.monotonic()
    with open_volume(spec.source) as vol:
        if vol.size != spec.volume_size:
            raise VolumeError(
                f"source {spec.source} is {vol.size} bytes but pair {spec.name} was created "
                f"for {spec.volume_size}; recreate the pair for the new size")
        old_state, old_hashes = store.load()
        state, known = plan_start(old_state, old_hashes, spec.block_size, vol.size)
        baseline = known is None
        state.clean = False
        store.save(state)
        pub = JournalPublisher(settings, spec.name, state.epoch, state.next_seq,
                               state.epoch_bytes, key=key, instance=spec.source,
                               limit=TokenBucket(link.rate_at) if link and link.limited
                               else None)
        try:
            first_seq = state.next_seq
            new_hashes, changed, changed_bytes = _scan(vol, spec.block_size, known, pub,
                                                       progress)
            last = pub.flush_point()
            pub.drain()
            j = pub.journaled
            state = CaptureState.closed(j, spec.block_size, vol.size)
            store.save(state, new_hashes)
            if baseline:
                announce_baseline(settings, spec.name, state.epoch)
            pub.beat("idle", {"last_scan_changed_bytes": str(changed_bytes)}, force=True)
            return ScanResult(state.epoch, first_seq, last, baseline,
                              block_count(vol.size, spec.block_size), changed, changed_bytes,
                              pub.bytes_sent, time.monotonic() - t0)
        finally:
            pub.close()


def _scan(vol: Volume, block_size: int, known: bytes | None, pub: JournalPublisher,
          progress: Progress | None) -> tuple[bytearray, int, int]:
    """Hash every block, journal the changed ones; returns (hash map, blocks, bytes)."""
    scan = _Pass(block_size, known, pub, RunBuilder(write_bound(block_size)),
                 bytearray(block_count(vol.size, block_size) * HASH_LEN))
    chunk = bytearray(max(CHUNK // block_size, 1) * block_size)
    for base in range(0, vol.size, len(chunk)):
        view = memoryview(chunk)[:min(len(chunk), vol.size - base)]
        holes = vol.stream_into(base, view)
        for off, n, hole in block_spans(len(view), block_size, holes):
            if hole:
                scan.hole(base + off, n)
            else:
                scan.block(base + off, view[off:off + n])
        # The chunk buffer is reused next round: close the open run before it is.
        pub.append_many(scan.runs.finish())
        if progress:
            progress(len(view))
    return scan.new_map, scan.changed, scan.changed_bytes


@dataclass
class _Pass:
    """One scan's new map, and the blocks it journaled against the old one."""

    block_size: int
    known: bytes | None         # the journaled map; None: a baseline, every block goes
    pub: JournalPublisher
    runs: RunBuilder
    new_map: bytearray
    changed: int = 0
    changed_bytes: int = 0

    def block(self, offset: int, block: memoryview) -> None:
        """A block read from the volume: journaled unless the old map has its hash."""
        h = hash_block(block)
        i = offset // self.block_size * HASH_LEN
        self.new_map[i:i + HASH_LEN] = h
        if self.known is None or self.known[i:i + HASH_LEN] != h:
            self._journaled(1, len(block))
            self.pub.append_many(self.runs.add_block(offset, block)[0])

    def hole(self, offset: int, length: int) -> None:
        """Whole blocks of a hole, all zeros: set and compared at once; journaled as one
        ZERO run by a baseline, block by block only where the old map knew otherwise."""
        bs = self.block_size
        zero_hashes_over(self.new_map, offset, length, bs)
        span = slice(offset // bs * HASH_LEN, (offset + length) // bs * HASH_LEN)
        if self.known is None:
            self._journaled(length // bs, length)
            self.pub.append_many(self.runs.add_zero(offset, length))
        else:
            for k in diff_maps(self.known[span], self.new_map[span]):
                self._journaled(1, bs)
                self.pub.append_many(self.runs.add_zero(offset + k * bs, bs))

    def _journaled(self, blocks: int, nbytes: int) -> None:
        self.changed += blocks
        self.changed_bytes += nbytes
