"""Pairs: names, specs and the fold of control events into each pair's current state."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable

from journal.errors import BadInput
from journal.history import HistorySettings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_BLOCK, MAX_BLOCK = 4096, 4 << 20


def validate_name(name: str) -> str:
    """A pair name is also part of a Kafka topic name, so it follows the topic rules."""
    if not _NAME.match(name):
        raise BadInput(f"pair name {name!r} is invalid: use 1-200 letters, digits, '.', '_' "
                       f"or '-', starting with a letter or digit")
    return name


def parse_size(text: str) -> int:
    """``64KiB``, ``1M``, ``4096`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise BadInput(f"size {text!r} is invalid: use a number with an optional unit, "
                       f"e.g. 64KiB, 1MiB, 4096")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit if unit != "B" else ""]


def validate_block_size(size: int) -> int:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise BadInput(f"block size {size} is invalid: use a power of two from 4KiB to 4MiB")
    return size


@dataclass(frozen=True)
class PairSpec:
    name: str
    source: str
    target: str
    block_size: int
    volume_size: int
    key_id: str = ""        # set when the journal is encrypted and authenticated


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
    attrs: dict[str, str] = field(default_factory=dict)
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
        return self.state == "needs-resync" and self.attrs.get("cause") == JOURNAL_LOST


@dataclass(frozen=True)
class ControlEvent:
    event: str
    pair: str
    at_ms: int
    spec: PairSpec | None = None
    attrs: dict[str, str] = field(default_factory=dict)


#: The ``cause`` of a ``resync-needed`` event when the journal lost its history (topic
#: recreated, broker data gone): only a hash resync repairs the target then.
JOURNAL_LOST = "journal-lost"

#: The operator set or changed a pair's history window (attrs: HistorySettings.to_attrs).
HISTORY_SET = "history-set"

#: States a failover, verify or failback may start from.
STEADY = ("created", "replicating")


def _epoch(ev: "ControlEvent") -> int:
    try:
        return int(ev.attrs.get("epoch", "0"))
    except ValueError:
        return 0


def fold(events: Iterable[ControlEvent],
         start: dict[str, PairState] | None = None) -> dict[str, PairState]:
    """Current pairs after applying ``events`` in order to ``start`` (a fold of the
    events before them, or nothing); unknown events are ignored so an older x2x can
    still read a newer control topic.

    Lifecycle: created -failover-requested-> failing-over -promoted-> promoted (direction
    reversed) -failback-started-> failing-back -failback-done-> replicating; a failed
    failover (failover-failed) returns to the state before it; resync-needed (e.g. a SEAL
    digest mismatch) wins over everything until resynced.
    """
    pairs: dict[str, PairState] = dict(start or {})
    for ev in events:
        p = pairs.get(ev.pair)
        if ev.event == "created" and ev.spec is not None:
            pairs[ev.pair] = PairState(ev.spec, ev.at_ms)
            continue
        if p is None:
            continue
        if ev.event == "deleted":
            del pairs[ev.pair]
        elif ev.event == "resync-needed":
            lost = ev.attrs.get("cause") == JOURNAL_LOST
            pairs[ev.pair] = replace(p, state="needs-resync", attrs={**p.attrs, **ev.attrs},
                                     replayable=p.replayable and not lost)
        elif ev.event == HISTORY_SET:
            pairs[ev.pair] = replace(p, history=HistorySettings.from_attrs(ev.attrs))
        elif ev.event == "baseline-complete":
            pairs[ev.pair] = replace(p, replayable=True)
        elif ev.event == "resynced":
            pairs[ev.pair] = replace(p, state="created", attrs={
                k: v for k, v in p.attrs.items() if k not in ("cause", "reason")})
        elif ev.event == "epoch-abandoned" and _epoch(ev):
            pairs[ev.pair] = replace(p, abandoned_epochs=p.abandoned_epochs | {_epoch(ev)})
        elif ev.event == "failover-requested" and p.replicating:
            pairs[ev.pair] = replace(p, state="failing-over",
                                     attrs={**p.attrs, "before_failover": p.state})
        elif ev.event == "failover-failed" and p.state == "failing-over":
            pairs[ev.pair] = replace(p, state=p.attrs.get("before_failover", "created"))
        elif ev.event == "promoted" and p.state in (*STEADY, "failing-over"):
            # Only the first promotion of a failover counts: a duplicate (a retried
            # command, a second applier) must not flip the direction back.
            pairs[ev.pair] = replace(p, state="promoted", reversed=not p.reversed,
                                     promoted_epoch=max(p.promoted_epoch, _epoch(ev)),
                                     attrs={**p.attrs, **{f"promoted_{k}": v for k, v in
                                                          ev.attrs.items()}})
        elif ev.event == "failback-started" and p.state in ("promoted", "failing-back"):
            pairs[ev.pair] = replace(p, state="failing-back")
        elif ev.event == "failback-done" and p.state == "failing-back":
            pairs[ev.pair] = replace(p, state="replicating")
    return pairs
