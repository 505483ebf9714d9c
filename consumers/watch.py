"""The watcher: applies a pair's journal on the target side like ``x2x apply`` and, for a
pair with automatic failover, promotes the target once the source is lost.

The decision rests on the journal's own evidence only (journal/fencing.py): no capturer
heartbeat and no journal progress for ``after``, while the capturer advertised a lease
short enough to have fenced itself by then. A watcher that cannot read the broker sees no
evidence and waits. The promotion is the forced failover (consumers/failover.py); the
watcher runs its hook only if the fold kept its promotion (two watchers: one wins).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from confluent_kafka import Consumer, Producer

from consumers.applier import Applier
from consumers.failover import Operation, force_failover
from infra import control, hooks
from infra.heartbeat import BeatTail, HeartbeatPublisher
from infra.kafka import KafkaSettings
from infra.logs import Repeats
from infra.reader import offsets_of
from infra.topics import journal_topic
from journal.errors import Busy, X2XError
from journal.fencing import SourceWatch, Verdict
from journal.pairs import PairState
from journal.reports import FailoverReport
from journal.status import Beat, newest
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.watch")


@dataclass
class Watcher:
    """One pair's watcher on its target host."""

    settings: KafkaSettings
    pair: str
    key: JournalKey | None = None
    on_promote: str | None = None
    poll: float = 0.5
    timeout: float = 300.0
    verdict: Verdict | None = field(init=False, default=None)
    _last_state: str = field(init=False, default="")

    def run(self, stop: threading.Event) -> FailoverReport | None:
        """Apply and watch until ``stop``, or until the target is promoted (by this watcher:
        its report; by anyone else: None)."""
        st = control.get_pair(self.settings, self.pair)
        spec = st.active_spec
        applier = _Applying(lambda: Applier(spec, spec.target, self.settings, key=self.key))
        producer = Producer(self.settings.side_producer())
        beats = HeartbeatPublisher(producer, self.pair, "watcher", spec.target, key=self.key)
        watch: SourceWatch | None = None
        not_before = 0.0
        evidence = _Evidence(self.settings, self.pair)
        blind = Repeats()
        try:
            while not stop.wait(self.poll):
                producer.poll(0)
                now = time.monotonic()
                try:
                    st = evidence.pairs.get(self.pair)
                    if st.state == "failing-over":
                        # Another watcher (or an operator) is promoting: ours would only
                        # collide with it. Watch on in case that failover fails.
                        applier.stop()
                        continue
                    if not st.replicating:
                        log.warning("pair %s is %s now: this watcher stops", self.pair,
                                    st.state)
                        return None
                    watch = self._evidence(evidence, st, watch, now)
                except X2XError as e:
                    if watch is not None:
                        watch.blind(now)
                    if blind.due(str(e), now):
                        log.warning("pair %s: cannot read the broker (%s): no evidence "
                                    "either way, waiting (said again every %.0f s while "
                                    "it lasts)", self.pair, e, blind.every_s)
                    continue
                if blind.over():
                    log.warning("pair %s: reading the broker again", self.pair)
                if not self.verdict.fail_over:
                    applier.start()
                self._tell(beats, applier)
                if self.verdict.fail_over and now >= not_before:
                    log.critical("pair %s: the source is lost: %s; promoting %s", self.pair,
                                 self.verdict.reason, spec.target)
                    applier.stop()
                    r = self._promote()
                    if r is not None:
                        return r
                    # Not promoted, and the pair still replicates or fails over: a second
                    # watcher's applier held the target, or its promotion is under way.
                    # Try again while the evidence stands, at a moment of our own, so two
                    # watchers do not collide again.
                    not_before = time.monotonic() + random.uniform(1.0, 3.0)
        finally:
            applier.stop()
            evidence.close()
            producer.flush(5)

    def _evidence(self, evidence: "_Evidence", st: PairState, watch: SourceWatch | None,
                  now: float) -> SourceWatch | None:
        """Read the heartbeats and the journal's end; set ``verdict``."""
        if st.auto is None:
            self.verdict = Verdict(False, False, f"automatic failover is off for pair "
                                                 f"{self.pair} ('x2x pair auto-failover "
                                                 f"{self.pair} --after 30s')")
            return None
        if watch is None or watch.auto != st.auto:
            watch = SourceWatch(st.auto, now)
        beat, journal_end = evidence.read(st)
        watch.observe(now, beat, journal_end)
        self.verdict = watch.verdict(now, beat)
        return watch

    def _tell(self, beats: HeartbeatPublisher, applier: "_Applying") -> None:
        """Heartbeat (status shows it) and a log line when armed-ness changes."""
        v = self.verdict
        state = "armed" if v.armed else "not-armed"
        detail = {"reason": v.reason[:300], "applying": "yes" if applier.running else
                  "standby (another applier holds the target)"}
        if v.left_s is not None:
            detail["failover_in_s"] = f"{v.left_s:.1f}"
        p = applier.applier.checkpointed
        beats.beat(state, p.epoch, p.seq, p.epoch_bytes, p.captured_at_ms, detail=detail)
        if self._last_state != state:
            self._last_state = state
            log.warning("pair %s: watcher %s: %s", self.pair, state, v.reason)

    def _promote(self) -> FailoverReport | None:
        op = Operation(self.settings, self.pair, self.key, _no_capturer_part,
                       lambda msg: log.info("pair %s: %s", self.pair, msg), self.timeout)
        try:
            r = force_failover(op)
        except X2XError as e:
            # Another watcher (or an operator) is failing over, or the target is busy.
            log.error("pair %s: this watcher did not promote (it tries again while the "
                      "source stays lost): %s", self.pair, e)
            return None
        won = control.get_pair(self.settings, self.pair).promotion
        if won is None or won.promoted_at_ms != r.promoted_at_ms:
            log.warning("pair %s: another promotion came first; this watcher's is ignored "
                        "and its hook does not run", self.pair)
            return None
        log.critical("pair %s: promoted %s at epoch %d seq %d; RPO %.1f s, %d ops lost",
                     self.pair, r.promoted, r.epoch, r.seq, r.rpo_s, r.rpo_ops)
        hooks.run(self.on_promote, "promote", pair=self.pair, epoch=r.epoch, seq=r.seq,
                  volume=r.promoted, rpo_s=f"{r.rpo_s:.3f}", rpo_ops=r.rpo_ops)
        return r


class _Evidence:
    """What the watcher reads at every poll, on consumers kept for its life: the pair's
    state, and the source's signs of life as the broker holds them now (its newest
    signed heartbeat and the journal's end), both asked of the broker at every poll (a
    round trip each; BrokerError when it cannot answer: the watcher is then blind).
    Reading all three afresh opened four clients twice a second on every armed target:
    one idle armed pair (its applier included) cost the broker 2.2 CPU s per 30 s here,
    0.1-0.35 s now."""

    def __init__(self, settings: KafkaSettings, pair: str) -> None:
        self.pair = pair
        self.pairs = control.PairsTail(settings)
        self._beats = BeatTail(settings)
        self._ends = Consumer(settings.consumer())

    def read(self, st: PairState) -> tuple[Beat | None, int]:
        """(the capturer's newest beat signed with the pair's key, the journal's end)."""
        # strict: a forged beat must not keep a lost source looking alive.
        beats = self._beats.latest({self.pair: st.spec}, strict=True, fresh=True)
        beat = newest(beats.values(), self.pair, "capturer", st.active_spec.source)
        return beat, offsets_of(self._ends, journal_topic(self.pair))[1]

    def close(self) -> None:
        self.pairs.close()
        self._beats.close()
        self._ends.close()


def _no_capturer_part(_st: PairState):
    raise X2XError("a forced failover needs nothing of the source")


class _Applying:
    """The applier in a thread; standing by while another applier holds the target.
    Stopped while the watcher promotes; started again if the promotion did not happen."""

    def __init__(self, make: Callable[[], Applier]) -> None:
        self.make = make
        self.applier = make()
        self.running = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start()

    def start(self) -> None:
        """Run the applier, unless it runs already or ended on its own."""
        if self._thread is not None:
            if not self._stop.is_set():
                return
            self.applier = self.make()      # an applier runs once
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                        name="x2x-watch-apply", daemon=True)
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.running = True
                self.applier.run(stop=stop)
                return
            except Busy:
                pass
            except X2XError as e:
                log.error("pair %s: applying stopped: %s", self.applier.spec.name, e)
            finally:
                self.running = False
            stop.wait(2.0)
            if not stop.is_set():
                self.applier = self.make()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
