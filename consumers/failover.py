"""Failover, failback, resync and verify: a plan's steps, performed in order, each
waiting on control events with a timeout.

journal/plans.py decides (may the command start, who does the capturer's part, what to
warn of); this module does the steps; journal/reports.py is what they report and the CLI
prints. The capturer's part is a :class:`CaptureSide` (consumers/capture_side.py). The
target's part is done here by an in-process :class:`Applier` unless an ``x2x apply``
service holds the target (it then does the same work and the answers arrive as control
events).

Every step is safe to repeat: a failed failover leaves the pair as it was
(failover-failed), a failback can be rerun from ``failing-back``, verify changes nothing
without ``--repair``.
"""
from __future__ import annotations

import datetime as dt
import threading
import time
from dataclasses import dataclass
from typing import Callable

from consumers import replica, seed
from consumers.applier import Applier, Comparison
from consumers.capture_side import CaptureSide, RemoteCapture
from consumers.checkpoint import CheckpointStore
from infra import control, retention, telemetry
from infra.control_tail import wait_event
from infra.heartbeat import read_beats
from infra.kafka import KafkaSettings
from journal.clock import now_ms
from journal.errors import BadInput, Busy, JournalError, X2XError
from journal.events import (FailbackDone, FailbackStarted, FailoverFailed, FailoverRequested,
                            HashesCompared, HashesPublished, Promoted, Resynced, ResyncNeeded,
                            Sealed)
from journal.pairs import PairSpec, PairState
from journal.plans import Command, Plan, Sides, plan
from journal.reports import FailoverReport, HashDiff
from journal.roles import Role
from journal.sequence import Limit, Position
from journal.status import Acknowledged, Beat, forced_loss, newest
from schemas.cipher import JournalKey

Say = Callable[[str], None]


@dataclass(frozen=True)
class Operation:
    """One operator command on one pair: what all of its steps share."""

    settings: KafkaSettings
    pair: str
    key: JournalKey | None
    #: This host's capturer part, used when no live NBD capturer serves the source.
    local: Callable[[PairState], CaptureSide]
    say: Say                 # progress, one line a step
    timeout: float = 300.0   # for each step


def signed_beats(settings: KafkaSettings, pair: str) -> list[Beat]:
    """The status topic's beats; of a keyed pair only those signed with its key, since
    what follows acts on them (a forged beat must not set a forced failover's goal)."""
    st = control.pairs(settings).get(pair)
    return read_beats(settings, {pair: st.spec} if st else None, strict=True)


def _beats(op: Operation) -> list[Beat]:
    return signed_beats(op.settings, op.pair)


def begin(op: Operation, command: Command) -> tuple[PairState, Plan]:
    """The pair's state and the plan for ``command`` (raises if it cannot start)."""
    st = control.get_pair(op.settings, op.pair)
    spec, beats = st.active_spec, _beats(op)
    sides = Sides(newest(beats, op.pair, "capturer", spec.source),
                  newest(beats, op.pair, "capturer", spec.target), now_ms())
    return st, plan(command, st, sides)


def _side(op: Operation, st: PairState, p: Plan) -> CaptureSide:
    if p.ask_capturer:
        return RemoteCapture(op.settings, op.pair, p.spec.source)
    return op.local(st)


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


# -- failover ------------------------------------------------------------------------------
@telemetry.traced("x2x.failover")
def failover(op: Operation) -> FailoverReport:
    """Planned failover: SEAL on the source, drain and verify on the target, promote."""
    st, p = begin(op, Command.FAILOVER)
    spec, since = p.spec, now_ms()
    try:
        sealed = _seal(op, st, p, since)
    except X2XError as e:
        control.publish(op.settings, FailoverFailed(pair=op.pair, reason=str(e)[:500]))
        raise
    op.say(f"sealed: epoch {sealed.epoch} seq {sealed.seq}, source digest "
           f"{sealed.digest.hex()[:16]}...; draining {spec.target}")
    # ``until``: an 'x2x apply' service may have drained to the SEAL (and promoted) already.
    applier = Applier(spec, spec.target, op.settings, key=op.key,
                      until=(sealed.epoch, sealed.seq), role=Role.OPERATOR)
    try:
        _applier_run(applier, op.timeout)
    except Busy:
        op.say(f"an 'x2x apply' service holds {spec.target}: waiting for it to reach the SEAL")
    except JournalError as e:
        # The applier marked the pair needs-resync (a SEAL digest mismatch among others).
        raise type(e)(f"{e}. Failover of pair {op.pair} FAILED: nothing was promoted") from None
    ev = wait_event(op.settings, since,
                    lambda ev: ev.pair == op.pair and isinstance(ev, Promoted), op.timeout,
                    f"the target {spec.target} was not promoted",
                    fail=lambda ev: (f"failover of pair {op.pair} FAILED, nothing promoted: "
                                     f"{ev.reason}")
                    if ev.pair == op.pair and isinstance(ev, ResyncNeeded) else None)
    assert isinstance(ev, Promoted)
    return FailoverReport(op.pair, spec.target, sealed.epoch, sealed.seq, False,
                          (ev.promoted_at_ms - sealed.refused_at_ms) / 1000, 0.0, 0,
                          sealed.digest.hex(), promoted_at_ms=ev.promoted_at_ms)


def _seal(op: Operation, st: PairState, p: Plan, since: int) -> Sealed:
    """The source refuses writes and journals SEAL: its live capturer, or this host."""
    if p.ask_capturer:
        op.say(f"asking the capturer of {p.spec.source} to refuse writes and seal")
        # Publishes failover-requested (with a request id) and waits for sealed.
        return RemoteCapture(op.settings, op.pair, p.spec.source).seal()
    op.say(f"no capturer serves {p.spec.source}: sealing it from here")
    control.publish(op.settings, FailoverRequested(pair=op.pair, at_ms=since,
                                                   source=p.spec.source, forced=False))
    sealed = op.local(st).seal()
    control.publish(op.settings, sealed)
    return sealed


@telemetry.traced("x2x.failover")
def force_failover(op: Operation, limit: Limit | None = None,
                   base: str | None = None) -> FailoverReport:
    """Unplanned failover: drain what the journal holds, promote at the last consistency
    point (with a ``limit``: the last one at or before it, anywhere in the history
    window), report the RPO against what the source was last known to have captured."""
    st, p = begin(op, Command.FORCE_FAILOVER)
    spec = p.spec
    control.publish(op.settings, FailoverRequested(pair=op.pair, source=spec.source,
                                                   forced=True))
    try:
        if limit is not None:
            _rewind(op, st, spec, limit, base)
        op.say(f"draining what the journal holds onto {spec.target}"
               + ("" if limit is None else f", up to {_point(limit)}"))
        applier = Applier(spec, spec.target, op.settings, key=op.key, role=Role.OPERATOR,
                          limit=limit)
        try:
            _applier_run(applier, op.timeout, until_caught_up=True)
        except Busy:
            raise Busy(f"an 'x2x apply' service holds {spec.target}; stop it (the forced "
                       f"failover drains the journal itself) and run the command again"
                       ) from None
    except X2XError as e:
        control.publish(op.settings, FailoverFailed(pair=op.pair, reason=str(e)[:500]))
        raise
    applied, seen = applier.checkpointed, applier.read_position
    # What the source's clients were told is done, journaled or not, as of its last
    # heartbeat, against what the target holds (journal/status.py).
    loss = forced_loss(newest(_beats(op), op.pair, "capturer", spec.source), applied.epoch,
                       applied.seq, applied.epoch_bytes, applied.captured_at_ms,
                       Acknowledged.journaled(seen.epoch, seen.seq, seen.epoch_bytes,
                                              seen.captured_at_ms))
    promoted = Promoted(
        pair=op.pair, volume=spec.target, epoch=loss.epoch, seq=applied.seq, forced=True,
        rpo_s=round(loss.rpo_s, 3), rpo_ops=loss.ops, promoted_at_ms=now_ms())
    control.publish(op.settings, promoted)
    return FailoverReport(op.pair, spec.target, applied.epoch, applied.seq, True, None,
                          loss.rpo_s, loss.ops, "", list(p.warnings),
                          rpo_max_s=loss.rpo_max_s, promoted_at_ms=promoted.promoted_at_ms)


def _rewind(op: Operation, st: PairState, spec: PairSpec, limit: Limit,
            base: str | None) -> None:
    """Bring a target that applied past ``limit`` back before it: a copy of the history
    base (or, for a journal that still starts with its full baseline, the whole journal
    replayed from its start), after which draining up to ``limit`` lands on the point."""
    store = CheckpointStore(op.pair, spec.target)
    cp = store.load()
    if cp is None or not limit.precedes(cp.position):
        return                      # at or before the point: draining up to it is enough
    when = _point(limit)
    if base is None:
        try:
            base = seed.find_base(op.settings, op.pair)
        except seed.NoBase:
            base = None
    if base is not None:
        op.say(f"{spec.target} applied past {when}: copying the history base {base} onto "
               f"it, then the journal up to that point")
        replica.seed_within(spec, base, spec.target, op.settings, limit)
        return
    low, _ = retention.watermarks(op.settings, op.pair)
    if low > 0 or not st.replayable:
        raise BadInput(
            f"pair {op.pair}: {spec.target} applied past {when} and no history base runs on "
            f"this host to bring it back; give the base's volume with --base PATH (or run "
            f"'x2x base {op.pair} --volume PATH' from now on). Nothing was promoted")
    op.say(f"{spec.target} applied past {when}: replaying the journal onto it from its "
           f"start (its full baseline) up to that point")
    with store.lock():
        store.reset()


def _point(limit: Limit) -> str:
    """The limit as the operator gave it: a time, or a group cut's barrier."""
    if limit.at_ms is not None:
        return _when(limit.at_ms)
    return f"offset {limit.offset}" if limit.offset is not None else f"{limit.epoch_seq}"


def _when(at_ms: int) -> str:
    return dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc).isoformat(
        timespec="seconds")


# -- failback, resync, verify: comparing block hashes ----------------------------------------
@telemetry.traced("x2x.failback")
def failback(op: Operation) -> HashDiff:
    """Make the old source the target of the promoted side: HASHES of the promoted side
    in its epoch, compared on the old source at the same journal point; only differing
    blocks are resent; then the old source follows the journal like any target."""
    st, p = begin(op, Command.FAILBACK)
    target = p.spec.target
    control.publish(op.settings, FailbackStarted(pair=op.pair, target=target))
    # The old source's history as a source means nothing as a target.
    r = _compare_from_hashes(op, p.spec, _side(op, st, p), "failback")
    control.publish(op.settings, FailbackDone(pair=op.pair, target=target,
                                              differing=r.differing, bytes_sent=r.bytes_sent))
    return r


@telemetry.traced("x2x.resync")
def resync(op: Operation) -> HashDiff:
    """The journal was lost under the target (topic recreated, broker data gone): the
    source publishes block HASHES (through its running NBD capturer, or here in a new
    epoch), the target compares them from a reset checkpoint, and only the differing
    blocks are resent. The way back without a full copy."""
    st, p = begin(op, Command.RESYNC)
    # A live NBD capturer journals the hashes and the resends itself, in its own epoch;
    # otherwise this host reads the source and opens a new epoch.
    # Whatever the target applied before, it is checked block by block, not trusted.
    r = _compare_from_hashes(op, p.spec, _side(op, st, p), "resync")
    control.publish(op.settings, Resynced(pair=op.pair, target=p.spec.target,
                                          differing=r.differing, bytes_sent=r.bytes_sent,
                                          epoch=r.epoch))
    return r


@telemetry.traced("x2x.verify")
def verify(op: Operation, repair: bool = False) -> HashDiff:
    """Compare source and target at one journal point without stopping replication."""
    st, p = begin(op, Command.VERIFY)
    spec, side = p.spec, _side(op, st, p)
    op.say(f"hashing {spec.source} into the journal")
    h = side.hashes()
    applier = Applier(spec, spec.target, op.settings, key=op.key, until=(h.epoch, h.seq),
                      role=Role.OPERATOR)
    try:
        _applier_run(applier, op.timeout)
    except Busy:
        return _verify_by_service(op, spec.target, side, h, repair)
    if not repair:
        cmp = _gather(applier, h)
        return HashDiff(cmp.blocks, len(set(cmp.differing)),
                        cmp.extents(spec.block_size, spec.volume_size), h.bytes, 0, h.epoch,
                        h.seq)
    return _resend_differing(op, side, applier, h)


def _compare_from_hashes(op: Operation, spec: PairSpec, side: CaptureSide,
                         what: str) -> HashDiff:
    """HASHES of the source into the journal; the target, its checkpoint reset, applies
    from that entry and compares; the differing extents are resent and applied."""
    op.say(f"hashing {spec.source} into the journal")
    h = side.hashes()
    if h.offset < 0:
        raise X2XError(f"pair {spec.name}: the journal offset of the HASHES entry is "
                       f"unknown; run 'x2x pair {what} {spec.name}' again")
    store = CheckpointStore(spec.name, spec.target)
    store.reset()
    applier = Applier(spec, spec.target, op.settings, key=op.key, store=store,
                      start=Position(h.epoch, h.first_seq - 1, h.offset - 1),
                      until=(h.epoch, h.seq), role=Role.OPERATOR)
    op.say(f"comparing {spec.target} with the hashes (epoch {h.epoch} from seq "
           f"{h.first_seq})")
    _applier_run(applier, op.timeout)
    return _resend_differing(op, side, applier, h)


def _resend_differing(op: Operation, side: CaptureSide, applier: Applier,
                      h: HashesPublished) -> HashDiff:
    """Resend what ``applier`` found different from ``h`` and apply it to its target."""
    cmp = _gather(applier, h)
    extents = cmp.extents(applier.spec.block_size, applier.spec.volume_size)
    resent, seq = 0, h.seq
    if extents:
        op.say(f"{len(set(cmp.differing))} of {cmp.blocks} blocks differ in {len(extents)} "
               f"extents: resending them")
        r = side.resend(extents)
        resent, seq = r.bytes, r.seq
        again = Applier(applier.spec, applier.target, op.settings, key=op.key,
                        until=(r.epoch, seq), role=Role.OPERATOR)
        _applier_run(again, op.timeout)
    return HashDiff(cmp.blocks, len(set(cmp.differing)), extents, h.bytes, resent, h.epoch,
                    seq)


def _gather(applier: Applier, h: HashesPublished) -> Comparison:
    """One request's HASHES may span several consistency points (client FLUSHes land
    between them): merge the comparisons of the checkpoints in its seq range."""
    out = Comparison(h.epoch, h.seq)
    for c in applier.comparisons:
        if c.epoch == h.epoch and h.first_seq <= c.seq <= h.seq:
            out.blocks += c.blocks
            out.differing.extend(c.differing)
    return out


def _verify_by_service(op: Operation, target: str, side: CaptureSide, h: HashesPublished,
                       repair: bool) -> HashDiff:
    """The target's running applier compares; its answer comes as hashes-compared."""
    op.say(f"an 'x2x apply' service holds {target}: waiting for its comparison")
    parts: list[HashesCompared] = []

    def part(ev) -> bool:
        if (isinstance(ev, HashesCompared) and ev.pair == op.pair and ev.target == target
                and ev.epoch == h.epoch and h.first_seq <= ev.seq <= h.seq):
            parts.append(ev)
            return ev.seq == h.seq
        return False
    wait_event(op.settings, 0, part, op.timeout, f"the applier of {target} did not compare")
    extents = sorted({e for ev in parts for e in ev.extents}, key=lambda e: e.offset)
    resent = 0
    if repair and extents:
        r = side.resend(extents)
        resent = r.bytes
        _wait_applied(op, target, (r.epoch, r.seq))
    return HashDiff(sum(ev.blocks for ev in parts), sum(ev.differing for ev in parts),
                    extents, h.bytes, resent, h.epoch, h.seq)


def _wait_applied(op: Operation, target: str, goal: tuple[int, int]) -> None:
    """Until the running applier of ``target`` reports ``goal`` (epoch, seq) applied."""
    deadline = time.monotonic() + op.timeout
    while True:
        b = newest(_beats(op), op.pair, "applier", target)
        if b is not None and (b.epoch, b.seq) >= goal:
            return
        if time.monotonic() > deadline:
            raise X2XError(f"the applier of {target} did not apply the resent extents "
                           f"within {op.timeout:.0f} s")
        time.sleep(0.5)
