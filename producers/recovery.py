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
from dataclasses import dataclass, field
from typing import Callable, Protocol

from confluent_kafka import Consumer, TopicPartition

from infra import control, telemetry
from infra.kafka import KafkaSettings
from infra.reader import check_record
from infra.topics import JOURNAL_CONFIG, ensure_base_topics, ensure_topic
from infra.volume import Volume
from journal.epochs import after_outage
from journal.errors import PairNotFound, X2XError
from journal.events import Created
from journal.pairs import PairSpec
from producers.announce import abandon_epoch, mark_journal_lost
from producers.health import Condition, Health
from producers.intent import IntentBitmap
from producers.journaling import RangeLocks
from journal.clock import now_ms
from producers.publisher import JournalPublisher
from producers.regions import journal_regions
from producers.state import CaptureState

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
    def count(_base: int, view: memoryview, _written: list[int]) -> None:
        progress.done += len(view)

    if not journal_regions(vol, pub, locks, block_size, extents, count, stop):
        return False
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


class Capture(Protocol):
    """What recovery asks of the capture service, which alone owns the epoch, the
    publisher and the background threads (producers/nbd_capture.py)."""

    @property
    def pub(self) -> JournalPublisher:
        """The current epoch's publisher; take it once per use (an epoch replaces it)."""
        ...

    @property
    def epoch(self) -> int: ...

    def begin_epoch(self, state: CaptureState) -> JournalPublisher:
        """Retire the current publisher, save and adopt ``state``, and journal into a
        fresh publisher of its epoch from now on; returns it."""
        ...

    def spawn(self, target: Callable[[], None], name: str) -> None: ...

    def resent(self) -> None:
        """Every marked extent is journaled again in this epoch (an unfinished baseline
        is superseded; the hash map must be refreshed at the clean stop)."""
        ...

    def beat(self, state: str | None = None, force: bool = False) -> None: ...

    def degrade(self, why: str) -> None:
        """Journaling stopped: writes are kept on the source and marked from now on."""
        ...


@dataclass
class Recovery:
    """The capturer's fault handling; the capturer calls :meth:`tick` from its tick loop.

    It reads and changes the capturer's :class:`~producers.health.Health` (degraded when
    the journal fails, resending in a new epoch, capturing once the resend is
    acknowledged) and asks the capture service for a new epoch when the broker is back."""

    capture: Capture
    spec: PairSpec
    settings: KafkaSettings
    vol: Volume
    locks: RangeLocks
    intent: IntentBitmap
    health: Health
    #: Set when the capturer stops: a resend ends early, no recovery starts.
    stopping: threading.Event
    #: The pair's creation time, to publish it again to a broker that lost it.
    incarnation: int | None = None
    progress: ResendProgress | None = field(init=False, default=None)
    outages: int = field(init=False, default=0)     # times the journal went down and came back
    _busy: threading.Lock = field(init=False, default_factory=threading.Lock)  # one at a time
    _next_try: float = field(init=False, default=0.0)

    # -- start ----------------------------------------------------------------------
    def resend_at_start(self) -> None:
        """After an unclean stop, in the start's new epoch: resend the marked extents."""
        self.progress = ResendProgress(self.intent.dirty_bytes())
        self.health.resending()
        self.capture.spawn(self._resend_thread, "x2x-resend")

    # -- the tick loop ------------------------------------------------------------------
    def tick(self) -> None:
        """Declare a stalled journal failed; while degraded, try to recover every RETRY s."""
        if self.health.condition is not Condition.DEGRADED:
            pub = self.capture.pub
            stalled = pub.stalled_for()
            if stalled <= STALL:
                return
            why = (f"the broker at {self.settings.bootstrap} acknowledged nothing of "
                   f"{pub.topic} for {stalled:.0f} s")
            pub.fail(why)
            # Degrade now, not at the next client request: in async mode no FLUSH waits
            # for the journal, and a quiet client would leave the outage unnoticed.
            self.capture.degrade(why)
            return
        if time.monotonic() >= self._next_try and not self._busy.locked():
            self._next_try = time.monotonic() + RETRY
            self.capture.spawn(self._recover, "x2x-recover")

    def detail(self) -> dict[str, str]:
        """Heartbeat detail: marked bytes, resend progress, outages, time degraded."""
        d = {"dirty_bytes": str(self.intent.dirty_bytes())}
        if self.progress is not None:
            d["resend"] = ("done" if self.progress.finished else
                           f"{self.progress.percent:.0f}%")
        if self.outages:
            d["outages"] = str(self.outages)
        degraded = self.health.degraded_for()
        if degraded is not None:
            d["degraded_s"] = f"{degraded:.0f}"
        return d

    # -- recovery -----------------------------------------------------------------------
    def _recover(self) -> None:
        if not self._busy.acquire(blocking=False):
            return
        name = self.spec.name
        try:
            if self.stopping.is_set():
                return
            try:
                admin = self.settings.check_reachable(timeout=2.0)
            except X2XError:
                return                       # still down; tick tries again
            old, epoch = self.capture.pub, self.capture.epoch
            if not old.failed:
                # Degraded by a full backlog, not an outage: the journal is intact. Once
                # it drained, the marked extents are resent in this same epoch.
                old.close_entry()             # what the last change left open goes too
                if old.unjournaled_bytes:
                    return
                self.health.resending()
                log.warning("pair %s: the backlog drained; epoch %d resends the marked "
                            "extents", name, epoch)
            else:
                self._new_epoch(admin, old, epoch)
        finally:
            self._busy.release()
        if self.health.condition is Condition.RESENDING:
            self._resend_thread()

    def _new_epoch(self, admin, old: JournalPublisher, epoch: int) -> None:
        """After an outage: journal into a new epoch, which resends the marked extents."""
        name = self.spec.name
        intact = journal_intact(self.settings, old.topic, old.last_acked)
        state = CaptureState.opening(after_outage(epoch), self.spec.block_size,
                                     self.vol.size)
        try:
            ensure_topic(admin, old.topic, JOURNAL_CONFIG)
            ensure_base_topics(admin)
            self._ensure_pair_known()
            abandon_epoch(self.settings, name, epoch, state.epoch)
        except X2XError as e:
            log.warning("pair %s: broker back but not ready: %s", name, e)
            return
        self.capture.begin_epoch(state)
        # Before writes are journaled again: what was appended to the failed journal
        # is no candidate of any point, so a client FLUSH in the new epoch cannot
        # clear a block before the resend below has sent it again.
        self.intent.reset_candidates()
        self.health.resending()           # from here writes are journaled again
        self.outages += 1
        if not intact:
            mark_journal_lost(self.settings, name, self.spec.source, state.epoch)
        log.warning("pair %s: broker back; epoch %d resends the marked extents%s",
                    name, state.epoch, "" if intact else
                    f"; the journal lost its records, so the target must be resynced by "
                    f"block hashes: run 'x2x pair resync {name}' (this capturer "
                    f"keeps serving and answers it)")

    def _ensure_pair_known(self) -> None:
        """A broker that lost its data lost the pair too: publish it again, so appliers
        find it (they then report JournalLost and are reset by the operator)."""
        spec = self.spec
        try:
            control.get_pair(self.settings, spec.name)
        except PairNotFound:
            # Stamped with its first creation time: the pair is the same one (StateStore).
            control.publish(self.settings, Created(
                pair=spec.name, at_ms=self.incarnation or now_ms(), spec=spec))

    def _resend_thread(self) -> None:
        name = self.spec.name
        with self._busy:
            pub = self.capture.pub
            cp = self.intent.begin(blocking=True, full=True)
            try:
                extents = list(self.intent.extents())
                self.progress = ResendProgress(sum(n for _, n in extents))
                t0 = time.monotonic()
                with telemetry.span("x2x.resend", pair=name, bytes=self.progress.total):
                    if not resend(self.vol, pub, self.locks, self.spec.block_size, extents,
                                  self.progress, self.stopping):
                        return
                pub.wait_journaled(self.progress.flush_seq, 120.0)
                self.intent.end(cp)
                cp = None
                self.progress.finished = True
                self.capture.resent()
                self.health.resent()
                log.info("pair %s: resent %d bytes in %d extents in %.1f s, FLUSH at seq %d",
                         name, self.progress.total, len(extents),
                         time.monotonic() - t0, self.progress.flush_seq)
                self.capture.beat(force=True)
            except X2XError as e:
                self.health.fail(str(e))
                log.error("pair %s: resend of the marked extents failed: %s", name, e)
            finally:
                if cp is not None:
                    self.intent.abort(cp)
