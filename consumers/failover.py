"""Failover, failback and verify: the steps, each waiting on control events with a timeout.

The capturer's part (SEAL, HASHES, resend) is done by the live NBD capturer when one
serves the source (requests on x2x.control, see producers/control_watch.py), else by the
CLI on this host (:class:`CaptureSide` given by the caller). The target's part is done
here by an in-process :class:`Applier` unless an ``x2x apply`` service holds the target
(it then does the same work and the answers arrive as control events).

Every step is safe to repeat: a failed failover leaves the pair as it was
(failover-failed), a failback can be rerun from ``failing-back``, verify changes nothing
without ``--repair``.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

from consumers.applier import Applier, Comparison
from consumers.checkpoint import CheckpointStore
from infra import control, telemetry
from infra.control_tail import wait_event
from infra.heartbeat import read_beats
from infra.kafka import KafkaSettings
from journal.blocks import Extent, format_extents, parse_extents
from journal.errors import Busy, JournalError, X2XError
from journal.pairs import ControlEvent, PairSpec, PairState
from journal.sequence import Position
from journal.status import Acknowledged, Beat, forced_loss, newest
from journal.roles import Role
from journal.clock import now_ms
from schemas.cipher import JournalKey

#: A capturer heartbeat younger than this (and not stopped/sealed) means it is serving.
FRESH_S = 8.0
ANSWER_TIMEOUT = 120.0
Say = Callable[[str], None]


class NotReady(X2XError):
    """The pair is not in a state this command can start from."""


class SplitBrain(X2XError):
    """Both sides of a pair took writes after a promotion."""


class Diverged(X2XError):
    """verify found target blocks that differ from the source."""


class CaptureSide(Protocol):
    """The capturer's part; each returns the attrs of its answer event."""

    def seal(self) -> dict[str, str]: ...
    def hashes(self) -> dict[str, str]: ...
    def resend(self, extents: list[Extent]) -> dict[str, str]: ...



def _beats(settings: KafkaSettings, pair: str) -> list[Beat]:
    """The status topic's beats; of a keyed pair only those signed with its key, since
    what follows acts on them (a forged beat must not set a forced failover's goal)."""
    st = control.pairs(settings).get(pair)
    return read_beats(settings, {pair: st.spec} if st else None, strict=True)


def serving_capturer(settings: KafkaSettings, pair: str, volume: str,
                     nbd_only: bool = False) -> Beat | None:
    """The newest heartbeat of a capturer running on ``volume`` now, or None; with
    ``nbd_only`` only an NBD capturer (the one that answers control requests)."""
    b = newest(_beats(settings, pair), pair, "capturer", volume)
    if b is None:
        return None
    fresh = (now_ms() - b.at_ms) / 1000 < FRESH_S
    if nbd_only and b.detail.get("capturer") != "nbd":
        return None
    return b if fresh and b.state not in ("stopped", "sealed", "stopped-unclean") else None


def last_capture_beat(settings: KafkaSettings, pair: str, volume: str) -> Beat | None:
    return newest(_beats(settings, pair), pair, "capturer", volume)


class RemoteCapture:
    """Asks the live NBD capturer of ``source`` through the control topic."""

    def __init__(self, settings: KafkaSettings, pair: str, source: str) -> None:
        self.settings, self.pair, self.source = settings, pair, source

    def _ask(self, event: str, answer: str, attrs: dict[str, str] | None = None,
             timeout: float = ANSWER_TIMEOUT) -> dict[str, str]:
        request, since = uuid.uuid4().hex[:12], now_ms()
        control.publish(self.settings, ControlEvent(event, self.pair, since, attrs={
            "request": request, "source": self.source, **(attrs or {})}))
        mine = lambda ev: ev.pair == self.pair and ev.attrs.get("request") == request  # noqa: E731
        ev = wait_event(
            self.settings, since, lambda ev: mine(ev) and ev.event == answer, timeout,
            f"the capturer of {self.source} did not answer {event}; is it still running? "
            f"(x2x status {self.pair})",
            fail=lambda ev: (f"pair {self.pair}: the capturer of {self.source} failed: "
                             f"{ev.attrs.get('reason')}") if mine(ev)
            and ev.event == "request-failed" else None)
        return dict(ev.attrs)

    def seal(self) -> dict[str, str]:
        return self._ask("failover-requested", "sealed", {"forced": "0"})

    def hashes(self) -> dict[str, str]:
        return self._ask("hashes-requested", "hashes-published")

    def resend(self, extents: list[Extent]) -> dict[str, str]:
        return self._ask("resend-requested", "resent", {"extents": format_extents(extents)})


@dataclass
class FailoverResult:
    pair: str
    promoted: str
    epoch: int
    seq: int
    forced: bool
    downtime_s: float | None = None
    rpo_s: float = 0.0
    rpo_ops: int = 0
    #: Forced: the most the target can miss. Writes the source took after its last
    #: heartbeat are unknown here (async mode acknowledges them before the journal has
    #: them), so the RPO is known only up to that; None when no beat was ever seen.
    rpo_max_s: float | None = None
    digest: str = ""
    warnings: list[str] = field(default_factory=list)


def _applier_run(applier: Applier, timeout: float, **kw) -> str:
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        stats = applier.run(stop=stop, **kw)
    finally:
        timer.cancel()
    if stats.stopped_by == "signal":
        raise X2XError(f"pair {applier.spec.name}: the target {applier.target} did not get "
                       f"there within {timeout:.0f} s (applied up to epoch "
                       f"{applier.checkpointed.epoch} seq {applier.checkpointed.seq})")
    return stats.stopped_by


def _pair(settings: KafkaSettings, name: str) -> PairState:
    return control.get_pair(settings, name)


@telemetry.traced("x2x.failover")
def failover(settings: KafkaSettings, name: str, key: JournalKey | None,
             local: Callable[[PairState], CaptureSide], say: Say,
             timeout: float = 300.0) -> FailoverResult:
    """Planned failover: SEAL on the source, drain and verify on the target, promote."""
    st = _pair(settings, name)
    if not st.replicating:
        raise NotReady(_not_steady(st, "fail over"))
    spec = st.active_spec
    since = now_ms()
    try:
        if serving_capturer(settings, name, spec.source, nbd_only=True):
            say(f"asking the capturer of {spec.source} to refuse writes and seal")
            # Publishes failover-requested (with a request id) and waits for sealed.
            sealed = RemoteCapture(settings, name, spec.source).seal()
        else:
            say(f"no capturer serves {spec.source}: sealing it from here")
            control.publish(settings, ControlEvent("failover-requested", name, since,
                                                   attrs={"source": spec.source,
                                                          "forced": "0"}))
            sealed = local(st).seal()
            control.publish(settings, ControlEvent("sealed", name, now_ms(), attrs={
                "source": spec.source, **sealed}))
    except X2XError as e:
        control.publish(settings, ControlEvent("failover-failed", name, now_ms(),
                                               attrs={"reason": str(e)[:500]}))
        raise
    epoch, seq = int(sealed["epoch"]), int(sealed["seq"])
    say(f"sealed: epoch {epoch} seq {seq}, source digest {sealed['digest'][:16]}...; "
        f"draining {spec.target}")
    # ``until``: an 'x2x apply' service may have drained to the SEAL (and promoted) already.
    applier = Applier(spec, spec.target, settings, key=key, until=(epoch, seq),
                      role=Role.OPERATOR)
    try:
        _applier_run(applier, timeout)
    except Busy:
        say(f"an 'x2x apply' service holds {spec.target}: waiting for it to reach the SEAL")
    except JournalError as e:
        # The applier marked the pair needs-resync (a SEAL digest mismatch among others).
        raise type(e)(f"{e}. Failover of pair {name} FAILED: nothing was promoted") from None
    ev = wait_event(settings, since,
                    lambda ev: ev.pair == name and ev.event == "promoted", timeout,
                    f"the target {spec.target} was not promoted",
                    fail=lambda ev: (f"failover of pair {name} FAILED, nothing promoted: "
                                     f"{ev.attrs.get('reason')}")
                    if ev.pair == name and ev.event == "resync-needed" else None)
    downtime = (int(ev.attrs["promoted_at_ms"]) - int(sealed["refused_at_ms"])) / 1000
    return FailoverResult(name, spec.target, epoch, seq, False, downtime, 0.0, 0,
                          sealed["digest"])


@telemetry.traced("x2x.failover")
def force_failover(settings: KafkaSettings, name: str, key: JournalKey | None, say: Say,
                   timeout: float = 300.0) -> FailoverResult:
    """Unplanned failover: drain what the journal holds, promote at the last consistency
    point, report the RPO against what the source was last known to have captured."""
    st = _pair(settings, name)
    # failing-over: a planned failover that could not finish (the source died mid-way).
    if not (st.replicating or st.state == "failing-over"):
        raise NotReady(_not_steady(st, "fail over"))
    spec = st.active_spec
    warnings = []
    if serving_capturer(settings, name, spec.source):
        warnings.append(
            f"the capturer of {spec.source} still looks alive; if the source comes back it "
            f"must not serve writes again: failback refuses while it does")
    control.publish(settings, ControlEvent("failover-requested", name, now_ms(),
                                           attrs={"source": spec.source, "forced": "1"}))
    say(f"draining what the journal holds onto {spec.target}")
    applier = Applier(spec, spec.target, settings, key=key, role=Role.OPERATOR)
    try:
        _applier_run(applier, timeout, until_caught_up=True)
    except Busy:
        raise Busy(f"an 'x2x apply' service holds {spec.target}; stop it (the forced "
                   f"failover drains the journal itself) and run the command again") from None
    applied, seen = applier.checkpointed, applier.read_position
    # What the source's clients were told is done, journaled or not, as of its last
    # heartbeat, against what the target holds (journal/status.py).
    loss = forced_loss(last_capture_beat(settings, name, spec.source), applied.epoch,
                       applied.seq, applied.epoch_bytes, applied.captured_at_ms,
                       Acknowledged.journaled(seen.epoch, seen.seq, seen.epoch_bytes,
                                              seen.captured_at_ms))
    rpo_s, rpo_ops, rpo_max_s, epoch = loss.rpo_s, loss.ops, loss.rpo_max_s, loss.epoch
    control.publish(settings, ControlEvent("promoted", name, now_ms(), attrs={
        "volume": spec.target, "epoch": str(epoch), "seq": str(applied.seq), "forced": "1",
        "rpo_s": f"{rpo_s:.3f}", "rpo_ops": str(rpo_ops),
        "promoted_at_ms": str(now_ms())}))
    return FailoverResult(name, spec.target, applied.epoch, applied.seq, True, None, rpo_s,
                          rpo_ops, rpo_max_s=rpo_max_s, warnings=warnings)


@dataclass
class HashDiff:
    """What comparing the block hashes of both sides found (verify, failback, resync),
    and what was sent to make them equal."""

    blocks: int
    differing: int
    extents: list[Extent]
    hash_bytes: int
    resent_bytes: int
    epoch: int
    seq: int

    @property
    def bytes_sent(self) -> int:
        return self.hash_bytes + self.resent_bytes


def _side(settings: KafkaSettings, st: PairState,
          local: Callable[[PairState], CaptureSide]) -> CaptureSide:
    src = st.active_spec.source
    if serving_capturer(settings, st.spec.name, src, nbd_only=True):
        return RemoteCapture(settings, st.spec.name, src)
    return local(st)


@telemetry.traced("x2x.failback")
def failback(settings: KafkaSettings, name: str, key: JournalKey | None,
             local: Callable[[PairState], CaptureSide], say: Say,
             timeout: float = 300.0) -> HashDiff:
    """Make the old source the target of the promoted side: HASHES of the promoted side
    in its epoch, compared on the old source at the same journal point; only differing
    blocks are resent; then the old source follows the journal like any target."""
    st = _pair(settings, name)
    if st.state not in ("promoted", "failing-back"):
        raise NotReady(f"pair {name} is {st.state}, not promoted: failback reverses a pair "
                       f"after 'x2x pair failover {name}'")
    spec = st.active_spec
    old = serving_capturer(settings, name, spec.target)
    if old is not None:
        raise SplitBrain(
            f"pair {name}: split brain. The old source {spec.target} is still serving writes "
            f"(capturer pid {old.pid} on {old.host}, {old.state}, epoch {old.epoch} seq "
            f"{old.seq}, seen {(now_ms() - old.at_ms) / 1000:.0f} s ago) while {spec.source} "
            f"was promoted at epoch {st.promoted_epoch}: both sides took writes since. "
            f"Nothing was changed. Stop the capturer of {spec.target} (its writes since the "
            f"promotion will be overwritten by those of {spec.source}), then run "
            f"'x2x pair failback {name}' again")
    control.publish(settings, ControlEvent("failback-started", name, now_ms(),
                                           attrs={"target": spec.target}))
    side = _side(settings, st, local)
    # The old source's history as a source means nothing as a target.
    r = _compare_from_hashes(settings, spec, side, key, timeout, say, "failback")
    control.publish(settings, ControlEvent("failback-done", name, now_ms(), attrs={
        "target": spec.target, "differing": str(r.differing),
        "bytes_sent": str(r.bytes_sent)}))
    return r


@telemetry.traced("x2x.resync")
def resync(settings: KafkaSettings, name: str, key: JournalKey | None,
           local: Callable[[PairState], CaptureSide], say: Say,
           timeout: float = 300.0) -> HashDiff:
    """The journal was lost under the target (topic recreated, broker data gone): the
    source publishes block HASHES (through its running NBD capturer, or here in a new
    epoch), the target compares them from a reset checkpoint, and only the differing
    blocks are resent. The way back without a full copy."""
    st = _pair(settings, name)
    if st.state in ("promoted", "failing-back"):
        raise NotReady(_not_steady(st, "resync"))
    spec = st.active_spec
    # A live NBD capturer journals the hashes and the resends itself, in its own epoch;
    # otherwise this host reads the source and opens a new epoch.
    side = _side(settings, st, local)
    # Whatever the target applied before, it is checked block by block, not trusted.
    r = _compare_from_hashes(settings, spec, side, key, timeout, say, "resync")
    control.publish(settings, ControlEvent("resynced", name, now_ms(), attrs={
        "target": spec.target, "differing": str(r.differing),
        "bytes_sent": str(r.bytes_sent), "epoch": str(r.epoch)}))
    return r


def _compare_from_hashes(settings: KafkaSettings, spec: PairSpec, side: CaptureSide,
                         key: JournalKey | None, timeout: float, say: Say,
                         what: str) -> HashDiff:
    """HASHES of the source into the journal; the target, its checkpoint reset, applies
    from that entry and compares; the differing extents are resent and applied."""
    say(f"hashing {spec.source} into the journal")
    h = side.hashes()
    epoch, first, offset = int(h["epoch"]), int(h["first_seq"]), int(h["offset"])
    if offset < 0:
        raise X2XError(f"pair {spec.name}: the journal offset of the HASHES entry is "
                       f"unknown; run 'x2x pair {what} {spec.name}' again")
    store = CheckpointStore(spec.name, spec.target)
    store.reset()
    applier = Applier(spec, spec.target, settings, key=key, store=store,
                      start=Position(epoch, first - 1, offset - 1), until=(epoch, int(h["seq"])),
                      role=Role.OPERATOR)
    say(f"comparing {spec.target} with the hashes (epoch {epoch} from seq {first})")
    _applier_run(applier, timeout)
    return _resync(settings, spec.name, spec.target, side, applier, h, key, timeout, say)


def _resync(settings: KafkaSettings, name: str, target: str, side: CaptureSide,
            applier: Applier, h: dict[str, str], key: JournalKey | None, timeout: float,
            say: Say) -> HashDiff:
    cmp = _gather(applier, h)
    extents = cmp.extents(applier.spec.block_size, applier.spec.volume_size)
    resent = 0
    seq = int(h["seq"])
    if extents:
        say(f"{len(set(cmp.differing))} of {cmp.blocks} blocks differ in {len(extents)} "
            f"extents: resending them")
        r = side.resend(extents)
        resent, seq = int(r["bytes"]), int(r["seq"])
        again = Applier(applier.spec, target, settings, key=key, until=(int(r["epoch"]), seq),
                        role=Role.OPERATOR)
        _applier_run(again, timeout)
    return HashDiff(cmp.blocks, len(set(cmp.differing)), extents, int(h["bytes"]), resent,
                  int(h["epoch"]), seq)


def _gather(applier: Applier, h: dict[str, str]) -> Comparison:
    """One request's HASHES may span several consistency points (client FLUSHes land
    between them): merge the comparisons of the checkpoints in its seq range."""
    epoch, first, last = int(h["epoch"]), int(h["first_seq"]), int(h["seq"])
    out = Comparison(epoch, last)
    for c in applier.comparisons:
        if c.epoch == epoch and first <= c.seq <= last:
            out.blocks += c.blocks
            out.differing.extend(c.differing)
    return out


@telemetry.traced("x2x.verify")
def verify(settings: KafkaSettings, name: str, key: JournalKey | None,
           local: Callable[[PairState], CaptureSide], say: Say, repair: bool = False,
           timeout: float = 300.0) -> HashDiff:
    """Compare source and target at one journal point without stopping replication."""
    st = _pair(settings, name)
    if not st.replicating:
        raise NotReady(_not_steady(st, "verify"))
    spec = st.active_spec
    side = _side(settings, st, local)
    say(f"hashing {spec.source} into the journal")
    h = side.hashes()
    epoch, seq = int(h["epoch"]), int(h["seq"])
    applier = Applier(spec, spec.target, settings, key=key, until=(epoch, seq),
                      role=Role.OPERATOR)
    try:
        _applier_run(applier, timeout)
    except Busy:
        return _verify_by_service(settings, name, spec.target, side, h, repair, timeout, say)
    if not repair:
        cmp = _gather(applier, h)
        return HashDiff(cmp.blocks, len(set(cmp.differing)),
                      cmp.extents(spec.block_size, spec.volume_size), int(h["bytes"]), 0,
                      epoch, seq)
    return _resync(settings, name, spec.target, side, applier, h, key, timeout, say)


def _verify_by_service(settings: KafkaSettings, name: str, target: str, side: CaptureSide,
                       h: dict[str, str], repair: bool, timeout: float, say: Say) -> HashDiff:
    """The target's running applier compares; its answer comes as hashes-compared."""
    say(f"an 'x2x apply' service holds {target}: waiting for its comparison")
    epoch, first, last = h["epoch"], int(h["first_seq"]), int(h["seq"])
    parts: list[ControlEvent] = []

    def part(ev: ControlEvent) -> bool:
        if (ev.pair == name and ev.event == "hashes-compared" and ev.attrs.get("target")
                == target and ev.attrs.get("epoch") == epoch
                and first <= int(ev.attrs.get("seq", "0")) <= last):
            parts.append(ev)
            return int(ev.attrs["seq"]) == last
        return False
    wait_event(settings, 0, part, timeout, f"the applier of {target} did not compare")
    extents = sorted({e for ev in parts for e in parse_extents(ev.attrs.get("extents", ""))},
                     key=lambda e: e.offset)
    blocks = sum(int(ev.attrs.get("blocks", "0")) for ev in parts)
    differing = sum(int(ev.attrs.get("differing", "0")) for ev in parts)
    resent = 0
    if repair and extents:
        r = side.resend(extents)
        resent = int(r["bytes"])
        goal = (int(r["epoch"]), int(r["seq"]))
        deadline = time.monotonic() + timeout
        while True:
            b = newest(_beats(settings, name), name, "applier", target)
            if b is not None and (b.epoch, b.seq) >= goal:
                break
            if time.monotonic() > deadline:
                raise X2XError(f"the applier of {target} did not apply the resent extents "
                               f"within {timeout:.0f} s")
            time.sleep(0.5)
    return HashDiff(blocks, differing, extents, int(h["bytes"]), resent, int(h["epoch"]),
                  int(h["seq"]))


def _not_steady(st: PairState, what: str) -> str:
    name = st.spec.name
    if st.state == "promoted":
        side = st.active_spec.source
        return (f"pair {name} was already failed over: {side} is promoted and the old source "
                f"is not a target yet. To {what} again, first run 'x2x pair failback {name}'")
    if st.state == "needs-resync":
        return (f"pair {name} needs a resync ({st.attrs.get('reason', '')[:200]}); cannot "
                f"{what} until 'x2x pair resync {name}' has repaired the target")
    return f"pair {name} is {st.state}; cannot {what} now: wait for it to finish or check " \
        f"'x2x pair show {name}'"
