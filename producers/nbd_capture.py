"""The NBD capturer as a service: serve the source over NBD, journal every change.

Wiring only: :class:`nbd.server.NBDServer` speaks the protocol,
:class:`producers.journaling.JournalingVolume` writes and journals, and
:func:`producers.baseline.run_baseline` publishes the whole source in a new epoch while
clients already write. This module decides the epoch, runs the heartbeat/linger loop and
performs the clean stop:

stop accepting -> finish requests in flight -> fsync the source -> FLUSH op -> journal
drained to the broker -> hash map refreshed -> state saved ``clean`` (same epoch next time).

A start that finds the state unclean (the last run died) begins a new epoch that resends
the extents the write-intent bitmap marks (producers/intent.py), or a full baseline when
there is no trusted bitmap. Broker outages while running are handled by
producers/recovery.py (degraded, then a new epoch resending the marked extents).
"""
from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from typing import Callable
from dataclasses import dataclass, field

from infra import control, telemetry
from infra.heartbeat import local_beat_path
from infra.kafka import KafkaSettings
from infra.paths import pair_dir
from infra.topics import JOURNAL_CONFIG, ensure_topic, journal_topic
from infra.volume import Volume, volume_digest
from journal.errors import BadInput, VolumeError, X2XError
from journal.pairs import PairSpec
from journal.ops import Op
from producers.control_watch import ControlWatch
from producers.deferred import hold_from_env
from producers.baseline import BaselineProgress, new_hash_map, refresh_hashes, run_baseline
from producers.journaling import JournalingVolume, Mode, RangeLocks
from journal.status import CAPTURE_BEAT_S
from nbd.server import NBDServer
from producers.publisher import JournalPublisher
from producers.intent import IntentBitmap
from producers.announce import abandon_epoch, mark_journal_lost
from producers.recovery import Recovery, journal_intact
from producers.spool import max_from_env as spool_max_from_env, Spool
from producers.state import CaptureState, StateStore, plan_start
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.capture")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 10809
BEAT_INTERVAL = CAPTURE_BEAT_S
#: How long queued ops may wait for more company before they are sent as an entry.
LINGER = 0.05
#: How long a clean stop lets requests in flight finish.
STOP_GRACE = 10.0
_LISTEN = re.compile(r"^(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):)?(?P<port>\d+)$")


def parse_listen(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); host defaults to
    127.0.0.1 so an export is never exposed beyond this machine by accident."""
    m = _LISTEN.match(text.strip())
    port = int(m.group("port")) if m else -1
    if not m or not 0 < port < 65536:
        raise BadInput(f"--nbd {text!r} is invalid: use [HOST:]PORT, e.g. 10809 or "
                       f"0.0.0.0:10809 (port 1-65535)")
    return m.group("v6") or m.group("host") or DEFAULT_HOST, port


@dataclass
class CaptureReport:
    """What one run of the capturer did, for the CLI's last line."""

    epoch: int = 0
    first_seq: int = 0
    last_seq: int = 0
    new_epoch: bool = False
    resend_bytes: int | None = None   # an unclean restart resent only the marked extents
    baseline_finished: bool = False
    ops: int = 0
    bytes: int = 0
    clean: bool = False
    error: str | None = None
    seconds: float = 0.0
    journal_lost: bool = False        # the broker lost what the last run journaled


@dataclass
class NBDCapture:
    """One pair's NBD capturer; ``start()`` then ``stop()``, or ``serve(stop_event)``."""

    spec: PairSpec
    settings: KafkaSettings
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    mode: Mode = Mode.ASYNC
    store: StateStore | None = None
    key: JournalKey | None = None
    locks: RangeLocks = field(default_factory=RangeLocks)
    beat_interval: float = BEAT_INTERVAL
    #: Most record bytes the async spool may hold (``X2X_SPOOL_MAX``); 0: no spool.
    spool_max: int = field(default_factory=spool_max_from_env)
    #: Seconds an async burst may stay on the source while clients write
    #: (``X2X_ASYNC_HOLD``, producers/deferred.py); 0 ships every write at once.
    hold: float = field(default_factory=hold_from_env)
    #: TLS for NBD clients (infra/tls.py); ``tls_required`` refuses plain-text clients.
    tls: ssl.SSLContext | None = None
    tls_required: bool = False
    report: CaptureReport = field(init=False, default_factory=CaptureReport)
    baseline: BaselineProgress | None = field(init=False, default=None)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _stopped: bool = field(init=False, default=False)
    _state_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    #: Set when a background thread died of an unexpected error: the capturer then stops
    #: (``serve`` returns, the CLI exits non-zero) so that its service manager restarts
    #: it, instead of serving on without heartbeats, stall detection or recovery.
    fatal: str | None = field(init=False, default=None)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> "NBDCapture":
        """Decide the epoch, open the source, start serving (and the baseline if needed)."""
        self._t0 = time.monotonic()
        self.store = self.store or StateStore(self.spec.name)
        self.vol = Volume(self.spec.source, writable=True)
        try:
            self._start()
        except BaseException:
            self._abort()
            raise
        return self

    def _start(self) -> None:
        vol, spec = self.vol, self.spec
        if vol.size != spec.volume_size:
            raise VolumeError(
                f"source {spec.source} is {vol.size} bytes but pair {spec.name} was created "
                f"for {spec.volume_size}; recreate the pair for the new size")
        # Listen first: a taken port must not cost the next start a new epoch.
        self.server = NBDServer(self.host, self.port, {}, tls=self.tls,
                                tls_required=self.tls_required,
                                on_request=lambda export, command, seconds:
                                telemetry.metrics().nbd_request(export, command, seconds))
        try:
            self.server.bind()
        except OSError as e:
            raise BadInput(f"cannot listen for NBD on {self.host}:{self.port}: {e.strerror}; "
                           f"pick another --nbd [HOST:]PORT or stop what uses it") from None
        self.port = self.server.port
        if not self.store.incarnation:
            self.store.incarnation = control.get_pair(self.settings, spec.name).created_at_ms
        old_state, old_hashes = self.store.load()
        lost = self._journal_lost_since(old_state)
        state, _ = plan_start(old_state, old_hashes, spec.block_size, vol.size, lost)
        continuing = state is old_state
        # After an unclean stop the write-intent bitmap, if trusted, bounds the resend
        # (producers/intent.py); without it, a full baseline.
        self.intent = IntentBitmap.open(spec.name, spec.block_size, vol.size)
        resync = not continuing and old_state is not None and self.intent.trusted
        # Continuing implies a saved map that fits (plan_start checks it); a new epoch
        # gets a fresh one, filled by the baseline.
        self.hashes = (bytearray(old_hashes) if continuing and old_hashes is not None
                       else new_hash_map(vol.size, spec.block_size))
        # From now until a clean stop the saved map is stale; a scan after a crash must
        # not diff against it, so it goes (a clean stop writes the refreshed one).
        self.store.hashes.unlink(missing_ok=True)
        state.clean = False
        self.store.save(state)
        self.state = state
        self.report = CaptureReport(state.epoch, state.next_seq, state.next_seq - 1,
                                    new_epoch=not continuing,
                                    resend_bytes=self.intent.dirty_bytes() if resync else None,
                                    journal_lost=lost)
        if lost:
            ensure_topic(self.settings.check_reachable(), journal_topic(spec.name),
                         JOURNAL_CONFIG)
            mark_journal_lost(self.settings, spec.name, spec.source, state.epoch)
        elif old_state is not None and not continuing:
            # The last run died: records it had sent may still be written late.
            abandon_epoch(self.settings, spec.name, old_state.epoch, state.epoch)
        self.pub = self.new_publisher(state.epoch, state.next_seq, state.epoch_bytes)
        self.backend = JournalingVolume(vol, self.pub, self.mode, spec.block_size, self.locks)
        self.backend.intent = self.intent
        self.recovery = Recovery(self, self.intent)
        self.server.exports[spec.name] = self.backend
        self.server.start()
        if resync:
            self.recovery.resend_at_start()
        elif not continuing:
            self.baseline = BaselineProgress(vol.size)
            self._spawn(self.recovery.baseline_thread, "x2x-baseline")
        self._spawn(self._tick_thread, "x2x-capture-tick")
        self.watch = ControlWatch(self).start()   # failover / verify / failback requests
        log.info("capturing pair %s at %s, epoch %d from seq %d (%s mode%s%s%s)", spec.name,
                 self.uri, state.epoch, state.next_seq, self.mode.value,
                 f", bursts held on the source up to {self.pub.hold:g} s (X2X_ASYNC_HOLD)"
                 if self.pub.hold else "",
                 ", baseline running" if self.baseline else "",
                 ", TLS required" if self.tls_required else ", TLS offered" if self.tls else "")
        self.beat(force=True)

    def _journal_lost_since(self, old: CaptureState | None) -> bool:
        """Does the broker still hold the last record it acknowledged to the previous run?
        A topic recreated or a broker that lost its data while no capturer ran is caught
        here, before this run journals a single op into a history that is no longer
        there. The broker must answer first: an unreachable one is not a lost journal."""
        if old is None or old.last_offset < 0 or not old.last_digest:
            return False
        self.settings.check_reachable()
        if journal_intact(self.settings, journal_topic(self.spec.name),
                          (old.last_offset, bytes.fromhex(old.last_digest))):
            return False
        log.warning("pair %s: the journal no longer holds the record at offset %d that the "
                    "broker acknowledged to the last run (topic recreated or broker data "
                    "lost): starting a new epoch; resync the target by block hashes with "
                    "'x2x pair resync %s' once this capturer serves", self.spec.name,
                    old.last_offset, self.spec.name)
        return True

    def _last_acked(self) -> tuple[int, str]:
        """(offset, digest hex) of the newest acknowledged record, as CaptureState keeps
        it; the saved one until this run has an acknowledgement."""
        acked = self.pub.last_acked
        if acked is None:
            return self.state.last_offset, self.state.last_digest
        return acked[0], acked[1].hex()

    def remember_last_acked(self) -> None:
        """Keep the newest acknowledged record in the saved state (see CaptureState)."""
        with self._state_lock:
            last = self._last_acked()
            if last != (self.state.last_offset, self.state.last_digest):
                self.state.last_offset, self.state.last_digest = last
                self.store.save(self.state)

    def switch_state(self, state: CaptureState) -> None:
        """Save and adopt a new epoch's state. Under the same lock as the heartbeat's save,
        so an older state can never be written over it (an epoch must not repeat)."""
        with self._state_lock:
            self.store.save(state)
            self.state = state

    def new_publisher(self, epoch: int, next_seq: int, epoch_bytes: int) -> JournalPublisher:
        """The journal publisher of an epoch; in async mode it spools a backlog to local
        disk (producers/spool.py) instead of holding clients at the broker's pace."""
        spool = (Spool(pair_dir(self.spec.name) / "spool", self.spool_max)
                 if self.mode.defers and self.spool_max else None)
        pub = JournalPublisher(self.settings, self.spec.name, epoch, next_seq, epoch_bytes,
                               key=self.key, instance=self.spec.source, spool=spool,
                               hold=self.hold if spool is not None else 0.0,
                               busy=self._clients_busy)
        pub.heartbeat.local_copy = local_beat_path(self.spec.name, "capturer")
        return pub

    def _clients_busy(self) -> bool:
        backend = getattr(self, "backend", None)     # the first publisher comes before it
        return backend is not None and backend.busy()

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "nbds" if self.tls_required else "nbd"     # libnbd's URI for TLS-only
        return f"{scheme}://{host}:{self.port}/{self.spec.name}"

    def serve(self, stop: threading.Event) -> CaptureReport:
        """Run until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT), then stop cleanly."""
        try:
            while not stop.wait(0.5) and not self._stopped:   # a SEAL stops it too
                if self.fatal is not None:
                    break
        finally:
            if hasattr(self, "watch"):
                self.watch.halt()       # lets a SEAL in progress finish and be announced
            report = self.stop()
        return report

    def stop(self, seal: bool = False) -> CaptureReport:
        """The clean stop; the state is saved clean only if nothing was lost on the way.
        With ``seal`` (planned failover) the last op is a SEAL carrying the source's
        whole-volume digest instead of a FLUSH."""
        if self._stopped:
            return self.report
        self._stopped = True
        if hasattr(self, "watch"):
            self.watch.halt()
        self.backend.close()                       # new requests: ESHUTDOWN
        self.server.stop(grace=STOP_GRACE)         # requests in flight finish
        self._stopping.set()
        for t in self._threads:
            t.join()
        failed = self.backend.failed
        try:
            self.vol.fsync()
            if failed is None and seal:
                self.sealed_digest = volume_digest(self.spec.source)
                self.pub.append(Op.seal(self.vol.size, self.sealed_digest))
            elif failed is None:
                self.pub.flush_point()
            if failed is None:
                self.pub.drain()
                self.backend.settle()
        except X2XError as e:
            failed = self.backend.failed = str(e)
        baseline_done = self.baseline is None or self.baseline.finished
        j = self.pub.journaled
        clean = failed is None and baseline_done and self.recovery.settled()
        if clean:
            self.intent.clear_all()       # the journal holds everything: nothing to resend
            hashes = None
            if self.hashes is not None:
                refresh_hashes(self.vol, self.hashes, self.backend.dirty, self.spec.block_size)
                hashes = bytes(self.hashes)
            self.store.save(CaptureState.closed(j, self.spec.block_size, self.vol.size,
                                                *self._last_acked()), hashes)
        # else: the state saved at start (clean=False) stays: the next start re-baselines.
        r = self.report
        r.last_seq, r.clean, r.error = j.seq, clean, failed
        r.baseline_finished = bool(self.baseline and self.baseline.finished)
        r.ops, r.bytes = self.backend.counters.ops, self.backend.counters.bytes
        r.seconds = time.monotonic() - self._t0
        try:
            self.beat(state=("sealed" if seal else "stopped") if clean else "stopped-unclean",
                      force=True)
        finally:
            self.pub.close()
            self.vol.close()
            self.intent.close()
        return r

    def _abort(self) -> None:
        """Undo a start that failed half-way (the state stays unclean)."""
        if hasattr(self, "server"):
            self.server.stop()
        self._stopping.set()
        for t in self._threads:
            t.join()
        if hasattr(self, "pub"):
            self.pub.close()
        if hasattr(self, "intent"):
            self.intent.close()
        self.vol.close()

    # -- consistency points and status --------------------------------------------------
    def sync_point(self, timeout: float = 60.0) -> int:
        """Journal a FLUSH now, wait until the broker holds everything up to it, and
        announce it in a heartbeat; returns its seq. (What a client FLUSH does, minus the
        fsync, for operators and tests.)"""
        seq = self.pub.flush_point()
        self.pub.wait_journaled(seq, timeout)
        self.beat(force=True)
        return seq

    def detail(self) -> dict[str, str]:
        c = self.backend.counters
        d = {"capturer": "nbd", "mode": self.mode.value, "listen": self.uri,
             "clients": str(len(self.server.clients)), "captured_ops": str(c.ops),
             "captured_bytes": str(c.bytes), "spooled_bytes": str(self.pub.spooled_bytes),
             "deferred_bytes": str(self.pub.deferred_bytes)}
        if self.baseline is not None:
            d["baseline"] = ("done" if self.baseline.finished
                             else f"{self.baseline.percent:.0f}%")
        if self.backend.failed:
            d["error"] = self.backend.failed[:300]
        d.update(self.recovery.detail())     # dirty_bytes, resync progress, outages
        return d

    def beat(self, state: str | None = None, force: bool = False) -> None:
        state = state or self.recovery.state_name()     # degraded / resending
        if state is None:
            state = ("journal-failed" if self.backend.failed else
                     "baseline" if self.baseline and not self.baseline.finished else
                     "capturing")
        now = time.monotonic()
        last_t, last_b = getattr(self, "_rate_mark", (self._t0, 0))
        total = self.backend.counters.bytes + (self.baseline.done if self.baseline else 0)
        rate = (total - last_b) / max(now - last_t, 1e-3)
        self._rate_mark = (now, total)
        self.pub.beat(state, self.detail(), force=force, rate_bps=rate)
        # Baseline and resend progress, 0..1, for dashboards (the beat carries the %).
        for running in (self.baseline, self.recovery.progress):
            if running is not None:
                telemetry.metrics().progress(self.spec.name, "capturer",
                                             running.percent / 100.0)

    # -- background threads -------------------------------------------------------------
    def _spawn(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a background thread that, if it dies of an unexpected error,
        stops the capturer with one log line naming it (see ``fatal``)."""
        def guarded() -> None:
            try:
                target()
            except Exception as e:  # noqa: BLE001 - whatever it was, serving on is worse
                self.fatal = f"background thread {name} failed: {type(e).__name__}: {e}"
                self.backend.failed = self.backend.failed or self.fatal
                log.critical("pair %s: %s; stopping the capturer (its service manager "
                             "restarts it; the write-intent bitmap resends what may be "
                             "missing)", self.spec.name, self.fatal, exc_info=True)

        # Finished threads are dropped: recovery attempts during a long outage must not
        # pile up here.
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=guarded, name=name, daemon=True)
        self._threads.append(t)
        t.start()

    def _baseline_thread(self) -> None:
        assert self.baseline is not None and self.hashes is not None
        try:
            done = run_baseline(self.vol, self.pub, self.locks, self.spec.block_size,
                                self.hashes, self.baseline, self._stopping)
        except X2XError as e:
            self.backend.failed = self.backend.failed or str(e)
            log.error("baseline of pair %s failed: %s", self.spec.name, e)
            return
        if done:
            log.info("baseline of pair %s done: %d bytes in %.1f s, FLUSH at seq %d",
                     self.spec.name, self.baseline.total, self.baseline.seconds,
                     self.baseline.flush_seq)
            self.beat(force=True)

    def _tick_thread(self) -> None:
        """Send lingering ops as an entry when the workload pauses; beat every interval."""
        next_beat = time.monotonic() + self.beat_interval
        while not self._stopping.wait(LINGER):
            try:
                if self.backend.failed is None:
                    self.pub.close_entry()
                self.backend.settle()     # an async FLUSH's point ends once journaled
                self.recovery.tick()      # stall check; degraded -> recover when back
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.beat_interval
                    self.beat(force=True)
                    self.remember_last_acked()
            except X2XError as e:
                self.backend.failed = self.backend.failed or str(e)
                log.error("journaling of pair %s stopped: %s", self.spec.name, e)

