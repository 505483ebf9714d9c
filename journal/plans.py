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
from journal.status import Beat

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
