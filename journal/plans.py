"""Deciding what an operator command must do to a pair, before anything is done.

From the folded pair state and the heartbeats of both sides, :func:`plan` decides
whether a failover, failback, resync or verify may start, which side does the capturer's
part (the live NBD capturer of the source, asked through the control topic, or this
host), and what the operator must be warned of. A command that cannot start gets no
plan but a refusal that says what stands in the way and which command resolves it
(:class:`NotReady`, :class:`SplitBrain`), like zrepl's logic/diff; nothing has been
changed then. consumers/failover.py performs a plan; journal/reports.py is what it
reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from journal.errors import BadInput, X2XError
from journal.pairs import STEADY, PairSpec, PairState
from journal.sequence import Position
from journal.status import CAPTURE_BEAT_S, Beat

#: A capturer heartbeat younger than this (and not stopped/sealed) means it is serving.
FRESH_S = 8.0


class NotReady(X2XError):
    """The pair is not in a state this command can start from."""


class SplitBrain(X2XError):
    """Both sides of a pair took writes after a promotion."""


class Command(str, Enum):
    """An operator command that moves a pair (``x2x pair COMMAND``)."""

    FAILOVER = "failover"
    FORCE_FAILOVER = "failover --force"
    FAILBACK = "failback"
    RESYNC = "resync"
    VERIFY = "verify"


#: How a refusal names what a command would do.
_VERB = {Command.FAILOVER: "fail over", Command.FORCE_FAILOVER: "fail over",
         Command.FAILBACK: "fail back", Command.RESYNC: "resync", Command.VERIFY: "verify"}


#: The states each command may start from (failback's refusal has its own message).
_STARTS = {
    Command.FAILOVER: STEADY,
    # failing-over: a planned failover that could not finish (the source died mid-way).
    Command.FORCE_FAILOVER: (*STEADY, "failing-over"),
    Command.FAILBACK: ("promoted", "failing-back"),
    Command.RESYNC: ("created", "replicating", "needs-resync", "failing-over"),
    Command.VERIFY: STEADY,
}


@dataclass(frozen=True)
class Sides:
    """What the heartbeats say of a pair's two volumes, read once."""

    source: Beat | None      # the newest capturer beat on the active source
    target: Beat | None      # ... on the active target (after a failover: the old source)
    now_ms: int


def serving(beat: Beat | None, now_ms: int, nbd_only: bool = False) -> bool:
    """Does ``beat`` say its capturer serves its volume now? With ``nbd_only``, only an
    NBD capturer counts (the one that answers control requests)."""
    if beat is None or (nbd_only and beat.detail.get("capturer") != "nbd"):
        return False
    fresh = (now_ms - beat.at_ms) / 1000 < FRESH_S
    return fresh and beat.state not in ("stopped", "sealed", "stopped-unclean")


@dataclass(frozen=True)
class Plan:
    """What a command does to a pair."""

    command: Command
    spec: PairSpec           # the pair in its current direction (source takes writes)
    #: The live NBD capturer of ``spec.source`` does the capturer's part (seal, hashes,
    #: resends); else this host does, from the capturer's saved state.
    ask_capturer: bool
    warnings: tuple[str, ...] = ()


def plan(command: Command, st: PairState, sides: Sides) -> Plan:
    """What ``command`` must do to the pair ``st``; raises NotReady or SplitBrain when it
    cannot start."""
    name, spec = st.spec.name, st.active_spec
    if st.state not in _STARTS[command]:
        if command is Command.FAILBACK:
            raise NotReady(f"pair {name} is {st.state}, not promoted: failback reverses a "
                           f"pair after 'x2x pair failover {name}'")
        raise NotReady(_not_ready(st, command))
    if command is Command.FORCE_FAILOVER:
        warnings = ()
        if serving(sides.source, sides.now_ms):
            warnings = (f"the capturer of {spec.source} still looks alive; if the source "
                        f"comes back it must not serve writes again: failback refuses "
                        f"while it does",)
        return Plan(command, spec, False, warnings)
    if command is Command.FAILBACK and serving(sides.target, sides.now_ms):
        raise SplitBrain(_split_brain(st, sides))
    return Plan(command, spec, serving(sides.source, sides.now_ms, nbd_only=True))


def _not_ready(st: PairState, command: Command) -> str:
    name, what = st.spec.name, _VERB[command]
    if st.state == "promoted":
        side = st.active_spec.source
        return (f"pair {name} was already failed over: {side} is promoted and the old source "
                f"is not a target yet. To {what} again, first run 'x2x pair failback {name}'")
    if st.state == "needs-resync":
        return (f"pair {name} needs a resync ({st.reason[:200]}); cannot "
                f"{what} until 'x2x pair resync {name}' has repaired the target")
    return f"pair {name} is {st.state}; cannot {what} now: wait for it to finish or check " \
        f"'x2x pair show {name}'"


def _split_brain(st: PairState, sides: Sides) -> str:
    name, spec, old = st.spec.name, st.active_spec, sides.target
    assert old is not None
    return (f"pair {name}: split brain. The old source {spec.target} is still serving writes "
            f"(capturer pid {old.pid} on {old.host}, {old.state}, epoch {old.epoch} seq "
            f"{old.seq}, seen {(sides.now_ms - old.at_ms) / 1000:.0f} s ago) while "
            f"{spec.source} was promoted at epoch {st.promoted_epoch}: both sides took writes "
            f"since. Nothing was changed. Stop the capturer of {spec.target} (its writes "
            f"since the promotion will be overwritten by those of {spec.source}), then run "
            f"'x2x pair failback {name}' again")


@dataclass(frozen=True)
class Loss:
    """What a forced promotion at ``applied`` loses of what the source captured."""

    epoch: int               # the newest epoch known: the promotion's (DESIGN rule 10)
    ops: int
    seconds: float
    #: The most the target can miss. Writes the source took after its last heartbeat
    #: are unknown here (async mode acknowledges them before the journal has them), so
    #: the RPO is known only up to that; None when no beat was ever seen.
    max_seconds: float | None = None


def forced_loss(applied: Position, read: Position, last_capture: Beat | None) -> Loss:
    """The RPO of promoting at ``applied`` when the journal was read up to ``read`` and
    the source's capturer last reported ``last_capture``: what it had acknowledged to
    its clients, journaled or not, as of that beat."""
    known = (read.epoch, read.seq, read.captured_at_ms)
    if last_capture is not None:
        b = last_capture
        ahead = (b.epoch, _count(b.detail.get("appended_seq"), b.seq),
                 _count(b.detail.get("appended_at_ms"), b.captured_at_ms))
        if ahead[:2] > known[:2]:
            known = ahead
    ops = known[1] - applied.seq if known[0] == applied.epoch else known[1]
    seconds = max(0.0, (known[2] - applied.captured_at_ms) / 1000) if ops else 0.0
    return Loss(max(known[0], applied.epoch), ops, seconds,
                _loss_bound(last_capture, seconds, applied.captured_at_ms))


def _loss_bound(beat: Beat | None, seconds: float, applied_ms: int) -> float | None:
    """Everything the source may have taken between the last applied write and its last
    sign of life (its last beat plus the beat interval); only what the journal knows when
    the source stopped cleanly."""
    if beat is None:
        return None
    if beat.state in ("stopped", "sealed"):
        return seconds
    seen_until = beat.at_ms + int(CAPTURE_BEAT_S * 1000)
    return max(seconds, (seen_until - applied_ms) / 1000) if applied_ms else None


def _count(text: str | None, default: int) -> int:
    """A number a heartbeat's detail carries, or ``default`` if absent or not a number."""
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def apply_target(st: PairState, target: str | None) -> str:
    """The volume ``x2x apply`` may apply the pair's journal to (``target`` or the pair's
    active target); after a failover the old source is not one until failback compared
    both sides."""
    spec = st.active_spec
    if st.state in ("promoted", "failing-back") and (target is None or target == spec.target):
        raise BadInput(f"pair {spec.name} was failed over to {spec.source}; its old source "
                       f"{spec.target} becomes a target with 'x2x pair failback {spec.name}', "
                       f"which compares both sides first")
    return target or spec.target
