"""The history base: a volume on the target side that follows the pair's history window.

Every cycle it applies the consistency points that left the window (an Applier with a
capture-time limit: only whole consistency points, its own checkpoint), then deletes
the journal's records below what journal/history.py allows: never above its own
checkpoint, never above what a registered reader still needs. The journal then holds
the window plus the lag of the slowest reader, not the volume's whole history; new
replicas and point-in-time copies start from a copy of the base (consumers/seed.py).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from confluent_kafka import Producer

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control, retention, telemetry
from infra.heartbeat import HeartbeatPublisher, read_beats
from infra.kafka import KafkaSettings
from journal.clock import now_ms
from journal.errors import BehindBase, BrokerError, Busy
from journal.history import (READER_TTL_MS, HistorySettings, Mark, base_limit,
                             deletable_below, held_payload, oldest_restorable_ms,
                             readers_of)
from journal.pairs import PairSpec
from journal.sequence import Position
from journal.status import Beat, newest
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.base")


@dataclass
class BaseReport:
    """One cycle of the base, as its heartbeat and ``x2x status`` show it."""

    window_ms: int | None
    position: Position              # the base's checkpoint
    low: int                        # the journal's first offset after this cycle
    high: int                       # the next offset to be written
    deleted: int                    # records deleted this cycle
    held_payload: int | None        # journal payload bytes from ``low`` to the head
    oldest_ms: int | None           # capture time of the oldest record kept
    restorable_ms: int | None       # the oldest point a replica can be built at
    holding: str                    # the reader that keeps records below the base, if any
    shrunk: bool = False            # over the journal limit: applied early this cycle

    def detail(self) -> dict[str, str]:
        def s(v: int | None) -> str:
            return "" if v is None else str(v)
        return {"window_ms": s(self.window_ms), "low": str(self.low), "high": str(self.high),
                "base_offset": str(self.position.offset), "held_payload": s(self.held_payload),
                "oldest_ms": s(self.oldest_ms), "restorable_ms": s(self.restorable_ms),
                "holding": self.holding, "shrunk": str(int(self.shrunk))}


def interval_for(history: HistorySettings) -> float:
    """Seconds between cycles: a tenth of the window, from 0.5 s to 30 s."""
    if history.window_ms is None:
        return 30.0
    return min(30.0, max(0.5, history.window_ms / 10_000))


class HistoryBase:
    """Runs the history base of one pair on one volume."""

    def __init__(self, spec: PairSpec, volume: str, settings: KafkaSettings,
                 key: JournalKey | None = None, reader_ttl_ms: int = READER_TTL_MS,
                 interval: float | None = None) -> None:
        self.spec, self.volume, self.settings, self.key = spec, volume, settings, key
        self.reader_ttl_ms, self.interval = reader_ttl_ms, interval
        self.store = CheckpointStore(spec.name, volume)
        self._oldest: Mark | None = None
        self._producer = Producer(settings.side_producer())
        self._beats = HeartbeatPublisher(self._producer, spec.name, "base", volume)
        self.reports: list[BaseReport] = []

    def run(self, stop: threading.Event) -> None:
        """Cycle until ``stop``; the window is read again every cycle, so a change with
        'x2x pair history' takes effect without a restart."""
        if not os.path.exists(self.volume):
            with open(self.volume, "wb") as f:
                f.truncate(self.spec.volume_size)
        try:
            history = HistorySettings()
            while not stop.is_set():
                try:
                    history = control.get_pair(self.settings, self.spec.name).history
                    self.reports.append(self.cycle(history, stop))
                    del self.reports[:-100]
                except BrokerError as e:
                    # The broker comes back; nothing was deleted that the rules forbid.
                    log.warning("pair %s: history base cycle failed, retrying: %s",
                                self.spec.name, e)
                stop.wait(self.interval or interval_for(history))
        finally:
            self._producer.flush(5)

    def cycle(self, history: HistorySettings, stop: threading.Event | None = None
              ) -> BaseReport:
        """Apply what left the window (and more, early, when the journal is over its
        limit), then delete what nobody needs any more."""
        now = now_ms()
        low, high = retention.watermarks(self.settings, self.spec.name)
        beats = read_beats(self.settings)
        cap = newest(beats, self.spec.name, "capturer")
        held_before = self._held(low, cap)
        limit = base_limit(now, history, held_before, cap.epoch if cap else 0,
                           cap.epoch_bytes if cap else 0)
        cp = self.store.load()
        if limit is not None:
            if cp is None and low > 0:
                raise BehindBase(
                    f"pair {self.spec.name}: the history base {self.volume} has no "
                    f"checkpoint but the journal starts at offset {low}: its history is gone. "
                    f"Seed it from a target stopped at its checkpoint: stop the pair's "
                    f"applier, then 'x2x base {self.spec.name} --volume {self.volume} "
                    f"--seed-from {self.spec.target}'")
            if limit.keep_bytes is not None:
                log.warning("pair %s: the journal holds %d bytes, over its limit of %d: the "
                            "history base applies early and the window shrinks (writes on "
                            "the source go on)", self.spec.name, held_before,
                            history.journal_max)
            try:
                Applier(self.spec, self.volume, self.settings, key=self.key,
                        store=self.store, limit=limit, publish_status=False).run(stop=stop)
            except Busy:
                log.info("pair %s: the base is being copied (a seed); next cycle",
                         self.spec.name)
            cp = self.store.load()
        pos = cp.position if cp is not None else Position()
        deleted, holding = 0, ""
        if limit is not None:
            # Readers are read after the apply: a replica seeded while the base was
            # unlocked registered (acknowledged) before the base could move past it.
            readers = readers_of(read_beats(self.settings), self.spec.name)
            safe = deletable_below(pos.offset, readers, low, now, self.reader_ttl_ms)
            if 0 <= safe < pos.offset:
                holding = next((r.instance for r in readers
                                if r.needs is not None and max(r.needs, 0) == safe), "")
            if safe > low:
                new_low = max(retention.delete_below(self.settings, self.spec.name, safe), safe)
                deleted, low = new_low - low, new_low
                log.info("pair %s: deleted journal records below offset %d (base at %d)",
                         self.spec.name, low, pos.offset)
        early = limit is not None and limit.keep_bytes is not None
        # The window stays shrunk while the base stands inside it (applied early).
        shrunk = early or (limit is not None and pos.captured_at_ms > limit.cut_ms)
        report = self._report(history, cap, pos, low, high, deleted, holding, shrunk, early,
                              now)
        self._beats.beat("following" if limit is not None else "idle (no window)",
                         pos.epoch, pos.seq, pos.epoch_bytes, pos.captured_at_ms,
                         detail=report.detail(), force=True)
        self._producer.poll(0)
        return report

    def _held(self, low: int, cap: Beat | None) -> int | None:
        """Payload bytes the journal holds from ``low`` to the capturer's head; across
        epochs, the head's epoch alone (a lower bound)."""
        if self._oldest is None or self._oldest.offset < low:
            self._oldest = retention.mark_at(self.settings, self.spec.name, low)
        if cap is None:
            return None
        held = held_payload(self._oldest, cap.epoch, cap.epoch_bytes)
        return cap.epoch_bytes if held is None else held

    def _report(self, history: HistorySettings, cap: Beat | None, pos: Position, low: int,
                high: int, deleted: int, holding: str, shrunk: bool, early: bool,
                now: int) -> BaseReport:
        self._held(low, cap)                  # the journal's oldest record, after deletion
        oldest = self._oldest
        held = (held_payload(oldest, cap.epoch, cap.epoch_bytes) if cap is not None
                else None)
        base = (Mark(pos.offset, pos.epoch, pos.epoch_bytes, 0, pos.captured_at_ms)
                if pos.offset >= 0 else None)
        report = BaseReport(history.window_ms, pos, low, high, deleted, held,
                            oldest.captured_at_ms if oldest else None,
                            oldest_restorable_ms(low, oldest, base), holding, shrunk)
        telemetry.metrics().history(
            self.spec.name, self.volume, held,
            None if oldest is None else max(0.0, (now - oldest.captured_at_ms) / 1000),
            early)
        return report
