"""Who may say what on the control plane: the three roles and the events each publishes.

Kafka's ACLs grant a principal access to whole topics, not to kinds of record. So each
role publishes its control events to a topic of its own (``infra/topics.py`` names
them), a principal may write only its role's topic, and readers accept an event only
from the topic of a role that may publish it. A capturer's principal can then not
promote a pair, request a failover or create a pair, whatever it writes.
"""
from __future__ import annotations

from enum import Enum

from journal.events import (BaselineComplete, EpochAbandoned, Event, HashesCompared,
                            HashesPublished, Promoted, RequestFailed, Resent, ResyncNeeded,
                            Sealed)


class Role(str, Enum):
    """A kind of x2x principal; ``docs/security.md`` lists each one's Kafka ACLs."""

    OPERATOR = "operator"      # the x2x CLI of whoever manages pairs
    CAPTURER = "capturer"      # x2x capture (NBD or scan), on the source host
    APPLIER = "applier"        # x2x apply, on the target host


_O, _C, _A = Role.OPERATOR, Role.CAPTURER, Role.APPLIER

#: The events a capturer or an applier may publish. The operator may publish every
#: event (its commands also run the capture or apply step themselves: a failover drains
#: the target in-process); capturers and appliers only what their own job says. Pair
#: lifecycle (created, deleted, failover-requested, failback-*, resynced,
#: history-set) and requests to capturers are the operator's alone.
PUBLISHERS: dict[type[Event], frozenset[Role]] = {
    # Answers of a live capturer to an operator's request.
    Sealed: frozenset({_C}),
    HashesPublished: frozenset({_C}),
    Resent: frozenset({_C}),
    RequestFailed: frozenset({_C}),
    # What a capturer announces about its own journal.
    BaselineComplete: frozenset({_C}),
    EpochAbandoned: frozenset({_C}),
    # A planned failover ends when the pair's own applier drains to the verified SEAL.
    Promoted: frozenset({_A}),
    HashesCompared: frozenset({_A}),
    # Either side can find that the target needs a resync.
    ResyncNeeded: frozenset({_C, _A}),
}


def may_publish(role: Role, kind: type[Event]) -> bool:
    """True if ``role`` may publish events of ``kind``."""
    return role is Role.OPERATOR or role in PUBLISHERS.get(kind, frozenset())
