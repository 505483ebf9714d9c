"""Faults of the NBD capturer: resend what a crash or an outage left unjournaled.

The write-intent bitmap (:mod:`producers.intent`) says which blocks may hold data the
broker never acknowledged. This module uses it in three places:

* **start after an unclean stop**: a new epoch resends exactly the marked extents (read
  under the range locks, WRITE/ZERO ops, then FLUSH) instead of a full baseline; the full
  baseline stays for a first start, a missing or untrusted bitmap (other volume, other
  boot) or a lost journal topic;
* **degraded**: when the publisher fails (delivery error, or no acknowledgement for
  ``X2X_JOURNAL_STALL`` seconds, default 10), async writes keep succeeding locally and
  only mark the bitmap; sync writes fail with EIO. Heartbeats say ``degraded`` with the
  marked bytes;
* **back**: once the broker answers, a new epoch starts on a fresh publisher and resends
  the marked extents, then streaming goes on. If the journal lost its records meanwhile
  (a memory-storage broker restarted, the topic recreated), the marked extents are not
  all the target misses: the pair is marked ``needs-resync`` (cause ``journal-lost``) and
  ``x2x pair resync NAME`` compares block hashes through this running capturer and resends
  only what differs. No full copy, and the source stays in service throughout.

Ordering is rule 7 of journal/DESIGN.md: a resend holds the region's range lock across
"read + append", as the baseline does, so it never overtakes a client write.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, TopicPartition

from infra import control, telemetry
from infra.kafka import KafkaSettings
from infra.reader import check_record
from infra.topics import JOURNAL_CONFIG, ensure_base_topics, ensure_topic
from infra.volume import Volume
from journal.epochs import after_outage
from journal.errors import PairNotFound, X2XError
from journal.events import Created
from journal.runs import RunBuilder, max_write as write_bound
from producers.announce import abandon_epoch, announce_baseline, mark_journal_lost
from producers.intent import IntentBitmap
from producers.journaling import RangeLocks
from journal.clock import now_ms
from producers.publisher import JournalPublisher
from producers.state import CaptureState

if TYPE_CHECKING:
    from producers.nbd_capture import NBDCapture

log = logging.getLogger("x2x.capture")

#: No acknowledgement for this long and the journal counts as down (librdkafka's own
#: message.timeout.ms, 30 s, is the backstop). Sync writes wait at most this long.
STALL = float(os.environ.get("X2X_JOURNAL_STALL", "10"))
#: While degraded, how often to ask whether the broker is back.
RETRY = 1.0


@dataclass
class ResendProgress:
    """A resend of marked extents in progress (for heartbeats and the final report)."""

    total: int
    done: int = 0
    finished: bool = False
    flush_seq: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0


def resend(vol: Volume, pub: JournalPublisher, locks: RangeLocks, block_size: int,
           extents: list[tuple[int, int]], progress: ResendProgress,
           stop: threading.Event | None = None) -> bool:
    """Journal the current content of ``extents`` in the publisher's epoch, then a FLUSH.

    One lock region at a time, read and appended under its lock; zero blocks go as ZERO
    ops. Returns False if ``stop`` was set first (nothing is then promised)."""
    region = locks.region
    max_write = write_bound(block_size)
    runs = RunBuilder(max_write)
    buf = bytearray(region)
    for offset, length in extents:
        pos, end = offset, offset + length
        while pos < end:
            if stop is not None and stop.is_set():
                return False
            chunk = min(end, (pos // region + 1) * region) - pos
            view = memoryview(buf)[:chunk]
            with locks.hold(pos, chunk):
                vol.readinto(pos, view)
                for off in range(0, chunk, block_size):
                    block = view[off:off + block_size]
                    pub.append_many(runs.add_block(pos + off, block)[0])
                # The ops point into ``buf``: close the run before it is reused.
                pub.append_many(runs.finish())
            progress.done += chunk
            pos += chunk
    progress.flush_seq = pub.flush_point()
    return True


def journal_intact(settings: KafkaSettings, topic: str,
                   last_acked: tuple[int, bytes] | None, timeout: float = 5.0) -> bool:
    """Does the broker still hold the last record it acknowledged to us (offset, entry
    digest), at its offset?

    A memory-storage broker that restarted comes back without it (the topic may even be
    auto-created empty by a client's retry), so topic existence alone proves nothing.
    Unknown (nothing acknowledged yet): answered False, the safe side."""
    if last_acked is None:
        return False
    offset, digest = last_acked
    consumer = Consumer(settings.consumer())
    try:
        consumer.assign([TopicPartition(topic, 0, offset)])
        return check_record(consumer, topic, offset, digest, timeout) is None
    finally:
        consumer.close()


class Recovery:
    """The capturer's fault handling; the capturer calls :meth:`tick` from its tick loop.

    States: ``capturing``, ``degraded`` (journal down, writes only marked), ``resending``
    (a new epoch resending marked extents; client writes are journaled meanwhile)."""

    def __init__(self, cap: "NBDCapture", intent: IntentBitmap) -> None:
        self.cap, self.intent = cap, intent
        self.state = "capturing"
        self.progress: ResendProgress | None = None
        self.outages = 0              # times the journal went down and came back
        self._busy = threading.Lock()  # one recovery or resend at a time
        self._next_try = 0.0
        self._degraded_at: float | None = None

    # -- start ----------------------------------------------------------------------
    def resend_at_start(self) -> None:
        """After an unclean stop, in the start's new epoch: resend the marked extents."""
        self.progress = ResendProgress(self.intent.dirty_bytes())
        self.state = "resending"
        self.cap._spawn(self._resend_thread, "x2x-resend")

    def baseline_thread(self) -> None:
        """The capturer's full baseline, with every bit set until its FLUSH is
        acknowledged: a crash half-way resends only what it had not journaled."""
        cap = self.cap
        cp = self.intent.begin(blocking=True, full=True)
        self.intent.set_all()
        try:
            with telemetry.span("x2x.baseline", pair=cap.spec.name,
                                epoch=cap.pub.journaled.epoch):
                cap._baseline_thread()
            if cap.baseline is not None and cap.baseline.finished:
                cap.pub.wait_journaled(cap.baseline.flush_seq, 60.0)
                self.intent.end(cp)
                cp = None
                announce_baseline(cap.settings, cap.spec.name, cap.pub.journaled.epoch)
        except X2XError as e:
            cap.backend.failed = cap.backend.failed or str(e)
        finally:
            if cp is not None:
                self.intent.abort(cp)

    # -- the tick loop ------------------------------------------------------------------
    def tick(self) -> None:
        cap = self.cap
        if cap.backend.failed is None:
            stalled = cap.pub.stalled_for()
            if stalled > STALL:
                cap.pub.fail(f"the broker at {cap.settings.bootstrap} acknowledged nothing of "
                             f"{cap.pub.topic} for {stalled:.0f} s")
            return
        if self.state != "degraded":
            self.state = "degraded"
            self._degraded_at = time.monotonic()
            log.error("pair %s degraded: %s; writes are kept on the source and marked; "
                      "marked extents are resent when the broker is back", cap.spec.name,
                      cap.backend.failed)
        if time.monotonic() >= self._next_try and not self._busy.locked():
            self._next_try = time.monotonic() + RETRY
            cap._spawn(self._recover, "x2x-recover")

    def settled(self) -> bool:
        """Nothing left to resend: the stop may be clean."""
        return self.state == "capturing"

    def state_name(self) -> str | None:
        return None if self.state == "capturing" else self.state

    def detail(self) -> dict[str, str]:
        d = {"dirty_bytes": str(self.intent.dirty_bytes())}
        if self.progress is not None:
            d["resend"] = ("done" if self.progress.finished else
                           f"{self.progress.percent:.0f}%")
        if self.outages:
            d["outages"] = str(self.outages)
        if self._degraded_at is not None and self.state == "degraded":
            d["degraded_s"] = f"{time.monotonic() - self._degraded_at:.0f}"
        return d

    # -- recovery -----------------------------------------------------------------------
    def _recover(self) -> None:
        if not self._busy.acquire(blocking=False):
            return
        cap = self.cap
        try:
            if cap._stopping.is_set():
                return
            try:
                admin = cap.settings.check_reachable(timeout=2.0)
            except X2XError:
                return                       # still down; tick tries again
            old = cap.pub
            intact = journal_intact(cap.settings, old.topic, old.last_acked)
            state = CaptureState.opening(after_outage(cap.state.epoch), cap.spec.block_size,
                                         cap.vol.size)
            try:
                ensure_topic(admin, old.topic, JOURNAL_CONFIG)
                ensure_base_topics(admin)
                self._ensure_pair_known()
                abandon_epoch(cap.settings, cap.spec.name, cap.state.epoch, state.epoch)
            except X2XError as e:
                log.warning("pair %s: broker back but not ready: %s", cap.spec.name, e)
                return
            old.fail("superseded by a new epoch")
            old.close(timeout=0)
            cap.switch_state(state)
            pub = cap.new_publisher(state.epoch, 1, 0)
            cap.backend.deferred.clear()        # promises made to the failed publisher
            cap.pub = cap.backend.pub = pub
            self.state = "resending"
            # Before writes are journaled again: what was appended to the failed journal
            # is no candidate of any point, so a client FLUSH in the new epoch cannot
            # clear a block before the resend below has sent it again.
            self.intent.reset_candidates()
            cap.backend.failed = None          # from here writes are journaled again
            self.outages += 1
            if not intact:
                mark_journal_lost(cap.settings, cap.spec.name, cap.spec.source, state.epoch)
            log.warning("pair %s: broker back; epoch %d resends the marked extents%s",
                        cap.spec.name, state.epoch, "" if intact else
                        f"; the journal lost its records, so the target must be resynced by "
                        f"block hashes: run 'x2x pair resync {cap.spec.name}' (this capturer "
                        f"keeps serving and answers it)")
        finally:
            self._busy.release()
        self._resend_thread()

    def _ensure_pair_known(self) -> None:
        """A broker that lost its data lost the pair too: publish it again, so appliers
        find it (they then report JournalLost and are reset by the operator)."""
        spec = self.cap.spec
        try:
            control.get_pair(self.cap.settings, spec.name)
        except PairNotFound:
            # Stamped with its first creation time: the pair is the same one (StateStore).
            control.publish(self.cap.settings, Created(
                pair=spec.name, at_ms=self.cap.store.incarnation or now_ms(), spec=spec))

    def _resend_thread(self) -> None:
        cap = self.cap
        with self._busy:
            cp = self.intent.begin(blocking=True, full=True)
            try:
                extents = list(self.intent.extents())
                self.progress = ResendProgress(sum(n for _, n in extents))
                self.state = "resending"
                t0 = time.monotonic()
                with telemetry.span("x2x.resend", pair=cap.spec.name,
                                    bytes=self.progress.total):
                    if not resend(cap.vol, cap.pub, cap.locks, cap.spec.block_size, extents,
                                  self.progress, cap._stopping):
                        return
                cap.pub.wait_journaled(self.progress.flush_seq, 120.0)
                self.intent.end(cp)
                cp = None
                self.progress.finished = True
                if cap.baseline is not None and not cap.baseline.finished:
                    cap.baseline = None      # superseded: this epoch holds every block
                # The hash map is not known for what was resent: re-hash at the clean stop.
                cap.backend.dirty[:] = b"\x01" * len(cap.backend.dirty)
                self.state = "capturing"
                log.info("pair %s: resent %d bytes in %d extents in %.1f s, FLUSH at seq %d",
                         cap.spec.name, self.progress.total, len(extents),
                         time.monotonic() - t0, self.progress.flush_seq)
                cap.beat(force=True)
            except X2XError as e:
                cap.backend.failed = cap.backend.failed or str(e)
                log.error("pair %s: resend of the marked extents failed: %s", cap.spec.name, e)
            finally:
                if cp is not None:
                    self.intent.abort(cp)
