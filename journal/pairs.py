"""Pairs: names, specs and the fold of control events into each pair's current state."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable

from journal.errors import BadInput
from journal.events import (AutoFailoverSet, BaselineComplete, Created, Deleted, EpochAbandoned, Event,
                            FailbackDone, FailbackStarted, FailoverFailed, FailoverRequested,
                            GroupSet, HistorySet, Promoted, RateSet, ResyncNeeded, Resynced)
from journal.fencing import AutoFailover
from journal.history import HistorySettings
from journal.rates import LinkLimit
from journal.spec import PairSpec
from journal.units import parse_size  # noqa: F401  (re-exported beside the pair rules)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
MIN_BLOCK, MAX_BLOCK = 4096, 4 << 20


def validate_name(name: str) -> str:
    """A pair name is also part of a Kafka topic name, so it follows the topic rules."""
    if not _NAME.match(name):
        raise BadInput(f"pair name {name!r} is invalid: use 1-200 letters, digits, '.', '_' "
                       f"or '-', starting with a letter or digit")
    return name


def validate_block_size(size: int) -> int:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise BadInput(f"block size {size} is invalid: use a power of two from 4KiB to 4MiB")
    return size


@dataclass(frozen=True)
class PairState:
    """What folding the control topic says about one pair.

    ``reversed``: a failover promoted the other side, so the active source is
    ``spec.target`` and the active target ``spec.source``. ``promoted_epoch``: the newest
    journal epoch at the last promotion; the promoted side captures in a later epoch, so
    an epoch never repeats in the journal (DESIGN rule 1).
    """

    spec: PairSpec
    created_at_ms: int
    # created (replicating) | needs-resync | failing-over | promoted | failing-back |
    # replicating (after a failback)
    state: str = "created"
    #: Why the pair needs a resync and the kind of cause (``JOURNAL_LOST`` or the name of
    #: the error an applier met); empty once resynced.
    reason: str = ""
    cause: str = ""
    #: The state a failover started from, returned to if it fails.
    before_failover: str = ""
    #: The last promotion (``None`` before the first failover).
    promotion: Promoted | None = None
    reversed: bool = False
    promoted_epoch: int = 0
    #: Epochs their capturer gave up on (an outage, a crash) and superseded with a later
    #: epoch that resends every block they may not have delivered: a record of one that
    #: the broker writes late, after the later epoch's, is stale and is skipped.
    abandoned_epochs: frozenset[int] = frozenset()
    #: False from a journal-lost mark until a full baseline is in the journal again: until
    #: then replaying the journal from its start cannot build a target (or a replica).
    replayable: bool = True
    #: The history window and journal limit (journal/history.py); default: keep forever.
    history: HistorySettings = HistorySettings()
    #: Automatic failover (journal/fencing.py); None: failover is the operator's act.
    auto: AutoFailover | None = None
    #: The link's bandwidth limit and schedule (journal/rates.py); default: none.
    link: LinkLimit = LinkLimit()
    #: The consistency group the pair belongs to (journal/groups.py); "": none.
    group: str = ""

    @property
    def active_spec(self) -> PairSpec:
        """The spec in the current direction (source = the side taking writes)."""
        s = self.spec
        return replace(s, source=s.target, target=s.source) if self.reversed else s

    @property
    def replicating(self) -> bool:
        return self.state in ("created", "replicating")

    @property
    def journal_lost(self) -> bool:
        """The journal lost its history and no hash resync has repaired the target yet."""
        return self.state == "needs-resync" and self.cause == JOURNAL_LOST


#: The ``cause`` of a ``resync-needed`` event when the journal lost its history (topic
#: recreated, broker data gone): only a hash resync repairs the target then.
JOURNAL_LOST = "journal-lost"

#: States a failover, verify or failback may start from.
STEADY = ("created", "replicating")


def fold(events: Iterable[Event],
         start: dict[str, PairState] | None = None) -> dict[str, PairState]:
    """Current pairs after applying ``events`` in order to ``start`` (a fold of the
    events before them, or nothing); kinds that change no pair's state (requests and
    answers) are passed over.

    Lifecycle: created -failover-requested-> failing-over -promoted-> promoted (direction
    reversed) -failback-started-> failing-back -failback-done-> replicating; a failed
    failover (failover-failed) returns to the state before it; resync-needed (e.g. a SEAL
    digest mismatch) wins over everything until resynced.
    """
    pairs: dict[str, PairState] = dict(start or {})
    for ev in events:
        p = pairs.get(ev.pair)
        if isinstance(ev, Created):
            pairs[ev.pair] = PairState(replace(ev.spec, incarnation=ev.at_ms), ev.at_ms)
            continue
        if p is None:
            continue
        match ev:
            case Deleted():
                del pairs[ev.pair]
            case ResyncNeeded():
                lost = ev.cause == JOURNAL_LOST
                pairs[ev.pair] = replace(p, state="needs-resync", reason=ev.reason,
                                         cause=ev.cause, replayable=p.replayable and not lost)
            case AutoFailoverSet():
                auto = (None if ev.after_ms is None or ev.lease_ms is None
                        else AutoFailover(ev.after_ms, ev.lease_ms))
                pairs[ev.pair] = replace(p, auto=auto)
            case RateSet():
                try:
                    pairs[ev.pair] = replace(p, link=LinkLimit.parse(ev.max_rate, ev.schedule))
                except BadInput:
                    pass        # 'x2x pair rate' validates; a malformed one changes nothing
            case GroupSet():
                pairs[ev.pair] = replace(p, group=ev.group or "")
            case HistorySet():
                pairs[ev.pair] = replace(p, history=HistorySettings(ev.window_ms, ev.journal_max))
            case BaselineComplete():
                pairs[ev.pair] = replace(p, replayable=True)
            case Resynced():
                pairs[ev.pair] = replace(p, state="created", reason="", cause="")
            case EpochAbandoned() if ev.epoch:
                pairs[ev.pair] = replace(p, abandoned_epochs=p.abandoned_epochs | {ev.epoch})
            case FailoverRequested() if p.replicating:
                pairs[ev.pair] = replace(p, state="failing-over", before_failover=p.state)
            case FailoverFailed() if p.state == "failing-over":
                pairs[ev.pair] = replace(p, state=p.before_failover or "created")
            case Promoted() if p.state in (*STEADY, "failing-over"):
                # Only the first promotion of a failover counts: a duplicate (a retried
                # command, a second applier) must not flip the direction back.
                pairs[ev.pair] = replace(p, state="promoted", reversed=not p.reversed,
                                         promoted_epoch=max(p.promoted_epoch, ev.epoch),
                                         promotion=ev)
            case FailbackStarted() if p.state in ("promoted", "failing-back"):
                pairs[ev.pair] = replace(p, state="failing-back")
            case FailbackDone() if p.state == "failing-back":
                pairs[ev.pair] = replace(p, state="replicating")
    return pairs


def signer(pairs: dict[str, PairState], ev: Event) -> PairSpec | None:
    """The spec whose key must have signed ``ev`` for the fold to take it, or None.

    A keyed pair's events are all signed with its key, its ``created`` included, so whoever
    may only write the control topics can neither replace the pair's spec (turn encryption
    off, point it at another device) nor drive its lifecycle. An unkeyed pair has no key:
    ACLs and the services' pins protect it (docs/security.md)."""
    p = pairs.get(ev.pair)
    if p is not None:
        return p.spec if p.spec.key_id else None
    if isinstance(ev, Created) and ev.spec.key_id:
        return replace(ev.spec, incarnation=ev.at_ms)
    return None
