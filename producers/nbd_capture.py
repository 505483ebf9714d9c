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

This service is the one owner of the capture's state: the epoch and its publisher (only
:meth:`NBDCapture.begin_epoch` replaces it), the baseline, the hash map, the background
threads, and the :class:`~producers.health.Health` that says whether the journal works.
Its helpers get narrow interfaces: recovery the :class:`~producers.recovery.Capture`
protocol, the control watch the :class:`~producers.control_watch.Requests` calls, the
journaling backend the publisher to use and the health to report to.
"""
from __future__ import annotations

import logging
import os
import re
import ssl
import threading
import time
from typing import Callable
from urllib.parse import quote
from dataclasses import dataclass, field

from infra import control, hooks, telemetry
from infra.heartbeat import local_beat_path
from infra.kafka import KafkaSettings
from infra.paths import pair_dir
from infra.topics import JOURNAL_CONFIG, ensure_topic, journal_topic
from infra.volume import Volume
from infra.volumes import volume_digest
from journal.clock import now_ms
from journal.errors import BadInput, VolumeError, X2XError
from journal.events import (AutoFailoverSet, FailoverRequested, HashesPublished,
                            HashesRequested, RateSet, ResendRequested, Resent, Sealed)
from journal.fencing import AutoFailover
from journal.pairs import PairSpec
from journal.rates import LinkLimit
from journal.ops import Op
from producers.control_watch import ControlWatch
from producers.deferred import hold_from_env
from producers.baseline import BaselineProgress, new_hash_map, refresh_hashes, run_baseline
from producers.health import Condition, Health
from producers.journaling import JournalingVolume, Mode, RangeLocks
from producers.lease import Lease
from journal.status import CAPTURE_BEAT_S
from nbd.server import NBDServer, host_port
from producers.publisher import (ASYNC_COALESCE_MS, ASYNC_LINGER_MS, WAITED_LINGER_MS,
                                 JournalPublisher)
from producers.rate import TokenBucket
from producers.intent import IntentBitmap
from producers.announce import abandon_epoch, announce_baseline, mark_journal_lost
from producers.recovery import Recovery, journal_intact
from producers.resync import emit_hashes, resend_extents
from producers.spool import max_from_env as spool_max_from_env, Spool
from producers.state import CaptureState, StateStore, plan_start
from schemas.cipher import JournalKey

log = logging.getLogger("x2x.capture")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 10809
BEAT_INTERVAL = CAPTURE_BEAT_S
#: How long queued ops may wait for more company before they are sent as an entry.
LINGER = 0.05
#: How often the newest acknowledged record is saved (two fsyncs of the state files).
SAVE_EVERY = 2.0
#: Default of ``--cut-interval``: seconds between consistency points the capturer makes on
#: its own while clients write without FLUSH (journal/DESIGN.md rule 16).
CUT_INTERVAL = 1.0
#: How long a clean stop lets requests in flight finish.
STOP_GRACE = 10.0
#: The longest unix socket path Linux binds (sun_path's 108 bytes, less its NUL).
UNIX_PATH_MAX = 107
_LISTEN = re.compile(r"^(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):)?(?P<port>\d+)$")


@dataclass(frozen=True)
class Listen:
    """Where a capturer serves NBD: ``host:port``, or the unix socket at ``path``."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    path: str | None = None

    def __str__(self) -> str:
        """As ``--nbd`` takes it."""
        return self.path if self.path is not None else host_port(self.host, self.port)

    def uri(self, export: str, tls: bool = False) -> str:
        """The NBD URI clients connect to (libnbd's, which qemu and nbdfuse read too);
        ``tls``: the TLS-only form."""
        scheme = "nbds" if tls else "nbd"
        if self.path is not None:
            # Escaped as a URI's query wants it (a space, '&', '%'); libnbd and QEMU
            # decode it.
            return f"{scheme}+unix:///{export}?socket={quote(self.path, safe='/')}"
        return f"{scheme}://{self}/{export}"


def listen_nbd(listen: Listen, tls: ssl.SSLContext | None = None,
               tls_required: bool = False) -> NBDServer:
    """An NBD server bound where ``listen`` says (not serving yet), its requests counted."""
    server = NBDServer(listen.host, listen.port, {}, tls=tls, tls_required=tls_required,
                       path=listen.path,
                       on_request=lambda export, command, seconds:
                       telemetry.metrics().nbd_request(export, command, seconds))
    try:
        server.bind()
    except OSError as e:
        raise BadInput(f"cannot listen for NBD on {listen}: {e.strerror or e}; pick "
                       f"another --nbd [HOST:]PORT or PATH, or stop what uses it") from None
    return server


def parse_listen(text: str) -> Listen:
    """``[HOST:]PORT`` (``[v6]:PORT`` for IPv6), or a unix socket's path (anything with a
    ``/``, made absolute: clients find it by that name) -> :class:`Listen`; the host
    defaults to 127.0.0.1 so an export is never exposed beyond this machine by accident."""
    text = text.strip()
    if "/" in text:
        path = os.path.abspath(text)
        if text.endswith("/") or len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise BadInput(f"--nbd {text!r} is invalid: a unix socket's path names a file "
                           f"and has at most {UNIX_PATH_MAX} bytes, e.g. /run/x2x/db.sock")
        return Listen(path=path)
    m = _LISTEN.match(text)
    port = int(m.group("port")) if m else -1
    if not m or not 0 < port < 65536:
        raise BadInput(f"--nbd {text!r} is invalid: use [HOST:]PORT, e.g. 10809 or "
                       f"0.0.0.0:10809 (port 1-65535), or a unix socket's path, e.g. "
                       f"/run/x2x/db.sock")
    return Listen(m.group("v6") or m.group("host") or DEFAULT_HOST, port)


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
    #: Seconds between the capturer's own consistency points while clients write without
    #: FLUSH (``--cut-interval``); 0: only client FLUSHes are consistency points.
    cut_interval: float = CUT_INTERVAL
    #: TLS for NBD clients (infra/tls.py); ``tls_required`` refuses plain-text clients.
    tls: ssl.SSLContext | None = None
    tls_required: bool = False
    #: A unix socket to serve on instead of ``host:port`` (``--nbd PATH``).
    path: str | None = None
    #: Run when the lease lapses and the capturer fences itself (infra/hooks.py).
    on_fence: str | None = None
    #: The NBD server this capture adds its export to, shared with the other pairs of
    #: its consistency group (producers/group.py), which starts and stops it; None: one
    #: of its own.
    shared_server: NBDServer | None = None
    #: What the group's capture service says in this member's heartbeats.
    group_figures: dict[str, str] = field(default_factory=dict)
    report: CaptureReport = field(init=False, default_factory=CaptureReport)
    baseline: BaselineProgress | None = field(init=False, default=None)
    #: Whether the journal takes what clients write; written only through its methods.
    health: Health = field(init=False)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _threads: list[threading.Thread] = field(init=False, default_factory=list)
    _stopped: bool = field(init=False, default=False)
    _state_lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    #: Set when a background thread died of an unexpected error: the capturer then stops
    #: (``serve`` returns, the CLI exits non-zero) so that its service manager restarts
    #: it, instead of serving on without heartbeats, stall detection or recovery.
    fatal: str | None = field(init=False, default=None)
    lease: Lease | None = field(init=False, default=None)
    _fence_told: bool = field(init=False, default=False)
    #: The pair's bandwidth limit (x2x pair rate), shared by every publisher it starts.
    limit: TokenBucket = field(init=False, default_factory=TokenBucket)
    link: LinkLimit = field(init=False, default_factory=LinkLimit)

    def __post_init__(self) -> None:
        self.health = Health(self.spec.name)

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
        self.server = self.shared_server or listen_nbd(
            Listen(self.host, self.port, self.path), self.tls, self.tls_required)
        self.port = self.server.port
        pair = control.get_pair(self.settings, spec.name)
        if not self.store.incarnation:
            self.store.incarnation = pair.created_at_ms
        # Automatic failover: hold a lease, renewed by heartbeats (journal/fencing.py).
        self._beat_default = self.beat_interval
        self._hold_lease(pair.auto)
        self.link = pair.link
        self.limit.set_rate_of(self.link.rate_at)
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
        self.hash_map = (old_hashes if continuing and old_hashes is not None
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
        self.backend = JournalingVolume(vol, self.pub, self.mode, spec.block_size, self.locks,
                                        health=self.health, intent=self.intent,
                                        fence=self._fence_check)
        self.recovery = Recovery(self, spec, self.settings, vol, self.locks, self.intent,
                                 self.health, self._stopping, self.store.incarnation)
        self.server.exports[spec.name] = self.backend
        if self.shared_server is None:
            self.server.start()
        if resync:
            self.recovery.resend_at_start()
        elif not continuing:
            self.baseline = BaselineProgress(vol.size)
            self.spawn(self._baseline_thread, "x2x-baseline")
        self.spawn(self._tick_thread, "x2x-capture-tick")
        # failover / verify / failback requests
        self.watch = ControlWatch(spec.name, spec.source, self.settings, self).start()
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

    @property
    def epoch(self) -> int:
        """The epoch being captured."""
        return self.state.epoch

    def begin_epoch(self, state: CaptureState) -> JournalPublisher:
        """Retire the current publisher and journal into a fresh one in ``state``'s epoch
        (recovery, once the broker is back): the one place the publisher is replaced.
        Each reader takes ``self.pub`` once per call, so none mixes two publishers."""
        old = self.pub
        old.fail("superseded by a new epoch")
        old.close(timeout=0)
        pub = self.new_publisher(state.epoch, state.next_seq, state.epoch_bytes)
        # Under the heartbeat's lock: an older state can never be saved over this one (an
        # epoch must not repeat), and the state and its publisher change together.
        with self._state_lock:
            self.store.save(state)
            self.state, self.pub = state, pub
        self.backend.use(pub)
        return pub

    def resent(self) -> None:
        """Recovery journaled every marked extent again in this epoch."""
        if self.baseline is not None and not self.baseline.finished:
            self.baseline = None      # superseded: this epoch holds every block
        # The hash map is not known for what was resent: re-hash at the clean stop.
        self.backend.mark_all_dirty()

    def degrade(self, why: str) -> None:
        """Journaling stopped (recovery found the broker stalled)."""
        self.backend.degrade(why)

    def new_publisher(self, epoch: int, next_seq: int, epoch_bytes: int) -> JournalPublisher:
        """The journal publisher of an epoch; in async mode it spools a backlog to local
        disk (producers/spool.py) instead of holding clients at the broker's pace."""
        spool = (Spool(pair_dir(self.spec.name) / "spool", self.spool_max)
                 if self.mode.defers and self.spool_max else None)
        pub = JournalPublisher(self.settings, self.spec.name, epoch, next_seq, epoch_bytes,
                               key=self.key, instance=self.spec.source, spool=spool,
                               hold=self.hold if spool is not None else 0.0,
                               busy=self._clients_busy, limit=self.limit,
                               linger_ms=(ASYNC_LINGER_MS if self.mode is Mode.ASYNC
                                          else WAITED_LINGER_MS),
                               coalesce_ms=ASYNC_COALESCE_MS if self.mode is Mode.ASYNC else 0.0)
        pub.heartbeat.local_copy = local_beat_path(self.spec.name, "capturer")
        # async: the backlog is bounded (spool, memory); full, the capturer degrades as for
        # an outage instead of making clients wait for the broker (journal/DESIGN.md 12).
        pub.full_fails = self.mode is Mode.ASYNC
        return pub

    def _clients_busy(self) -> bool:
        backend = getattr(self, "backend", None)     # the first publisher comes before it
        return backend is not None and backend.busy()

    @property
    def uri(self) -> str:
        return Listen(self.host, self.port, self.path).uri(self.spec.name, self.tls_required)

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
        if self.shared_server is None:
            self.backend.close()                   # new requests: ESHUTDOWN
            self.server.stop(grace=STOP_GRACE)     # requests in flight finish
        else:
            self.backend.quiesce()                 # the group's other exports go on
        self._stopping.set()
        for t in self._threads:
            t.join()
        pub = self.pub          # no epoch can begin any more: the threads are gone
        failed = self.health.reason
        try:
            self.vol.fsync()
            if failed is None and seal:
                self.sealed_digest = volume_digest(self.spec.source)
                pub.append(Op.seal(self.vol.size, self.sealed_digest))
            elif failed is None:
                pub.flush_point()
            if failed is None:
                pub.drain()
                self.backend.settle()
        except X2XError as e:
            failed = str(e)
            self.health.fail(failed)
        baseline_done = self.baseline is None or self.baseline.finished
        j = pub.journaled
        # Capturing: not degraded, and no resend left unfinished.
        clean = (failed is None and baseline_done
                 and self.health.condition is Condition.CAPTURING)
        if clean:
            self.intent.clear_all()       # the journal holds everything: nothing to resend
            hashes = None
            if self.hash_map is not None:
                refresh_hashes(self.vol, self.hash_map, self.backend.dirty,
                               self.spec.block_size)
                hashes = self.hash_map      # quiesced: written as it is, not copied
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
            pub.close()
            self.vol.close()
            self.intent.close()
        return r

    def _abort(self) -> None:
        """Undo a start that failed half-way (the state stays unclean)."""
        if hasattr(self, "server") and self.shared_server is None:
            self.server.stop()
        elif hasattr(self, "server"):
            self.server.exports.pop(self.spec.name, None)
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
        pub = self.pub
        seq = pub.flush_point()
        pub.wait_journaled(seq, timeout)
        self.beat(force=True)
        return seq

    def detail(self, pub: JournalPublisher | None = None) -> dict[str, str]:
        """The heartbeat's detail (of ``pub``, the current publisher by default)."""
        pub = pub or self.pub
        c = self.backend.counters
        d = {"capturer": "nbd", "mode": self.mode.value, "listen": self.uri,
             "clients": str(len(self.server.clients)), "captured_ops": str(c.ops),
             "captured_bytes": str(c.bytes), "cuts": str(c.cuts),
             "spooled_bytes": str(pub.spooled_bytes),
             "deferred_bytes": str(pub.deferred_bytes)}
        baseline = self.baseline
        if baseline is not None:
            d["baseline"] = "done" if baseline.finished else f"{baseline.percent:.0f}%"
        reason = self.health.reason
        if reason:
            d["error"] = reason[:300]
        d.update(self.recovery.detail())     # dirty_bytes, resend progress, outages
        d.update(self.group_figures)
        return d

    def beat(self, state: str | None = None, force: bool = False) -> None:
        """Publish a heartbeat: ``state``, or the health's (degraded / resending), or
        ``baseline`` while one runs, else ``capturing``."""
        pub, baseline, lease = self.pub, self.baseline, self.lease
        if state is None:
            condition = self.health.condition
            state = ("fenced" if lease and lease.fenced else
                     condition.value if condition is not Condition.CAPTURING else
                     "baseline" if baseline and not baseline.finished else "capturing")
        now = time.monotonic()
        last_t, last_b = getattr(self, "_rate_mark", (self._t0, 0))
        total = self.backend.counters.bytes + (baseline.done if baseline else 0)
        rate = (total - last_b) / max(now - last_t, 1e-3)
        self._rate_mark = (now, total)
        detail, acked = self.detail(pub), None
        detail.update(self._link_figures(pub, now))
        if lease is not None:
            # Every beat renews the lease once the broker has it (journal/fencing.py).
            detail["lease_ms"] = str(int(lease.lease_s * 1000))
            sent = time.monotonic()
            acked, force = (lambda: lease.renewed(sent)), True
        pub.beat(state, detail, force=force, rate_bps=rate, acked=acked)
        since = pub.unjournaled_since_ms()
        telemetry.metrics().unjournaled(
            self.spec.name, pub.unjournaled_bytes,
            max(0.0, (now_ms() - since) / 1000) if since else 0.0)
        # Baseline and resend progress, 0..1, for dashboards (the beat carries the %).
        for running in (baseline, self.recovery.progress):
            if running is not None:
                telemetry.metrics().progress(self.spec.name, "capturer",
                                             running.percent / 100.0)

    def _link_figures(self, pub: JournalPublisher, now: float) -> dict[str, str]:
        """What journal/linkstate.py needs besides the publisher's ``unjournaled_bytes``:
        the send and write rates since the last beat, the rate in force, when the broker
        last acknowledged anything."""
        t, sent, written = getattr(self, "_link_mark", (self._t0, 0, 0))
        journaled, acked = pub.journaled, getattr(self, "_acked", None)
        if acked is None or journaled != acked[0] or not pub.unjournaled_bytes:
            self._acked = acked = (journaled, now_ms())
        if now - t >= 1.0 or not hasattr(self, "_link_rates"):    # forced beats between
            dt = max(now - t, 1e-3)
            self._link_rates = (f"{(self.limit.sent - sent) / dt:.0f}",
                                f"{(self.backend.counters.bytes - written) / dt:.0f}")
            self._link_mark = (now, self.limit.sent, self.backend.counters.bytes)
        rate = self.limit.rate
        d = {"sent_bps": self._link_rates[0],
             "write_bps": self._link_rates[1], "progress_at_ms": str(acked[1])}
        if rate is not None:
            d["max_rate_bps"] = str(rate)
        if self.baseline is not None:
            d["baseline_total"] = str(self.baseline.total)
            d["baseline_done"] = str(self.baseline.done)
        return d

    # -- what the control watch asks (producers/control_watch.py) -------------------------
    def seal(self, ev: FailoverRequested) -> Sealed:
        """Planned failover: refuse writes, journal SEAL, drain, stop; the ``sealed``
        answer (epoch, seq, digest, refused_at_ms)."""
        self._check_serving()
        refused_at = now_ms()
        report = self.stop(seal=True)
        if not report.clean:
            raise X2XError(f"the capturer could not seal cleanly: "
                           f"{report.error or 'baseline not finished'}")
        return Sealed(pair=self.spec.name, source=self.spec.source, request=ev.request,
                      epoch=report.epoch, seq=report.last_seq, digest=self.sealed_digest,
                      refused_at_ms=refused_at)

    def hashes(self, ev: HashesRequested) -> HashesPublished:
        """Journal HASHES of the whole source and a FLUSH; where they landed."""
        self._check_serving()
        p = emit_hashes(self.vol, self.pub, self.locks, self.spec.block_size)
        self.beat(force=True)
        return p.answer(HashesPublished, self.spec.name, self.spec.source, ev.request)

    def resend(self, ev: ResendRequested) -> Resent:
        """Journal the current content of the request's extents and a FLUSH."""
        self._check_serving()
        p = resend_extents(self.vol, self.pub, self.locks, list(ev.extents),
                           self.spec.block_size)
        self.beat(force=True)
        return p.answer(Resent, self.spec.name, self.spec.source, ev.request)

    def rate(self, ev: RateSet) -> None:
        """``x2x pair rate``: the new limit is in force within a second."""
        try:
            self.link = LinkLimit.parse(ev.max_rate, ev.schedule)
        except BadInput as e:
            log.warning("pair %s: ignoring a malformed rate-set: %s", self.spec.name, e)
            return
        self.limit.set_rate_of(self.link.rate_at)
        log.info("pair %s: link %s", self.spec.name, self.link.describe())
        self.beat(force=True)

    def _check_serving(self) -> None:
        if self._stopped:
            raise X2XError("the capturer is stopping")

    # -- background threads -------------------------------------------------------------
    def spawn(self, target: Callable[[], None], name: str) -> None:
        """Run ``target`` in a background thread that, if it dies of an unexpected error,
        stops the capturer with one log line naming it (see ``fatal``)."""
        def guarded() -> None:
            try:
                target()
            except Exception as e:  # noqa: BLE001 - whatever it was, serving on is worse
                self.fatal = f"background thread {name} failed: {type(e).__name__}: {e}"
                self.health.fail(self.fatal)
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
        """The full baseline, with every bit of the write-intent bitmap set until its
        FLUSH is acknowledged: a crash half-way resends only what it had not journaled."""
        progress, pub, name = self.baseline, self.pub, self.spec.name
        assert progress is not None and self.hash_map is not None
        cp = self.intent.begin(blocking=True, full=True)
        self.intent.set_all()
        try:
            with telemetry.span("x2x.baseline", pair=name, epoch=pub.journaled.epoch):
                try:
                    done = run_baseline(self.vol, pub, self.locks, self.spec.block_size,
                                        self.hash_map, progress, self._stopping)
                except X2XError as e:
                    self._failed(pub, str(e))
                    log.error("baseline of pair %s failed: %s", name, e)
                    return
            if not done:
                return
            log.info("baseline of pair %s done: %d bytes in %.1f s, FLUSH at seq %d",
                     name, progress.total, progress.seconds, progress.flush_seq)
            self.beat(force=True)
            if self.baseline is progress:       # not superseded by a resend meanwhile
                pub.wait_journaled(progress.flush_seq, 60.0)
                self.intent.end(cp)
                cp = None
                announce_baseline(self.settings, name, pub.journaled.epoch)
        except X2XError as e:
            self._failed(pub, str(e))
        finally:
            if cp is not None:
                self.intent.abort(cp)

    def _failed(self, pub: JournalPublisher, reason: str) -> None:
        """``pub`` failed: the capturer is degraded, unless a new epoch already replaced
        that publisher (its failure then says nothing about the new one)."""
        if pub is self.pub:
            self.health.fail(reason)

    def _hold_lease(self, auto: AutoFailover | None) -> None:
        """Hold a lease of ``auto``'s length, or none. A fenced capturer stays fenced
        whatever the pair says now (only a restart lifts it, journal/fencing.py)."""
        if self.lease is not None and self.lease.fenced:
            return
        if auto is None:
            self.lease, self.beat_interval = None, self._beat_default
            return
        if self.lease is None or self.lease.lease_s != auto.lease_ms / 1000:
            # From now on, as if just renewed: the capturer has just heard the broker.
            self.lease = Lease(self.spec.name, auto.lease_ms / 1000)
        self.beat_interval = min(self._beat_default, auto.renew_s)

    def auto_failover_changed(self, ev: AutoFailoverSet) -> None:
        """The pair's automatic failover changed while capturing: follow it now."""
        auto = (None if ev.after_ms is None or ev.lease_ms is None
                else AutoFailover(ev.after_ms, ev.lease_ms))
        self._hold_lease(auto)
        log.warning("pair %s: automatic failover %s", self.spec.name,
                    "off: no lease held" if self.lease is None else
                    f"on: holding a {self.lease.lease_s:g} s lease" + (
                        " (fenced: stays fenced until restarted)" if self.lease.fenced
                        else ""))
        self.beat(force=True)

    def _fence_check(self) -> str | None:
        lease = self.lease
        return lease.check() if lease is not None else None

    def _fenced(self) -> bool:
        """Has the lease lapsed? The first time: say so and run the fence hook."""
        if self.lease is None or self.lease.check() is None:
            return False
        if not self._fence_told:
            self._fence_told = True
            self.beat(force=True)         # heard only if the broker is reachable again
            hooks.run(self.on_fence, "fence", pair=self.spec.name, epoch=self.epoch,
                      volume=self.spec.source, reason=self.lease.fenced)
        return True

    @property
    def stopped(self) -> bool:
        """Has this capture stopped (a clean stop or a SEAL)?"""
        return self._stopped

    def may_barrier(self) -> bool:
        """May a group cut include this capture now? Only while every change reaches the
        journal in order: capturing (not degraded, no resend running), baseline done,
        not fenced, not stopped."""
        baseline = self.baseline
        return (not self._stopped and self.health.condition is Condition.CAPTURING
                and (baseline is None or baseline.finished)
                and not (self.lease and self.lease.fenced))

    def _may_cut(self) -> bool:
        """Cuts are made where the target can be consistent (:meth:`may_barrier`): not
        while a baseline or a resend runs (the target is consistent only from its own
        FLUSH on), nor while degraded."""
        return self.cut_interval > 0 and self.may_barrier()

    def _tick_thread(self) -> None:
        """Send lingering ops as an entry when the workload pauses; cut a consistency
        point when clients wrote without FLUSH for ``cut_interval``; beat every interval."""
        next_beat = time.monotonic() + self.beat_interval
        next_save = next_beat
        while not self._stopping.wait(LINGER):
            try:
                if self._may_cut():
                    self.backend.cut(self.cut_interval)
                if self.health.condition is not Condition.DEGRADED:
                    self.pub.close_entry()
                self.backend.settle()     # an async FLUSH's point ends once journaled
                if self._fenced():
                    continue              # no new epoch, no resend: the target may be promoted
                self.recovery.tick()      # stall check; degraded -> recover when back
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.beat_interval
                    self.beat(force=True)
                if time.monotonic() >= next_save:
                    next_save = time.monotonic() + SAVE_EVERY
                    self.remember_last_acked()
            except X2XError as e:
                self.health.fail(str(e))
                log.error("journaling of pair %s stopped: %s", self.spec.name, e)
