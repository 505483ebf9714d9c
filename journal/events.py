"""The control protocol: one frozen dataclass per kind of control event, typed fields.

Every event names its pair and when it was stamped; each kind adds what it says, as the
types it means (ints, flags, extents, a :class:`PairSpec`). A kind's wire name is its
``NAME``, the only place that string is written: code matches on the classes, and
``schemas/control.py`` alone turns an event into its record on the control topics and
back (each field is the ``attrs`` entry of the same name; a field that is None is left
out of the record).

The kinds, by who publishes them (``journal/roles.py``):

- pair lifecycle, by the operator: :class:`Created`, :class:`Deleted`,
  :class:`FailoverRequested`, :class:`FailoverFailed`, :class:`FailbackStarted`,
  :class:`FailbackDone`, :class:`Resynced`;
- requests to a live NBD capturer (operator) and its answers (capturer):
  :class:`FailoverRequested` → :class:`Sealed`, :class:`HashesRequested` →
  :class:`HashesPublished`, :class:`ResendRequested` → :class:`Resent`, any of them →
  :class:`RequestFailed`; an answer carries the request's id;
- a capturer about its journal: :class:`BaselineComplete`, :class:`EpochAbandoned`;
- an applier about its target: :class:`Promoted`, :class:`HashesCompared`;
- either side: :class:`ResyncNeeded`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from journal.blocks import Extent
from journal.clock import now_ms
from journal.spec import PairSpec


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every control event has: its pair and the time it was stamped."""

    NAME: ClassVar[str] = ""
    pair: str
    at_ms: int = field(default_factory=now_ms)


# -- pair lifecycle ------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Created(Event):
    """A pair exists with ``spec`` (its incarnation is ``at_ms``)."""

    NAME: ClassVar[str] = "created"
    spec: PairSpec


@dataclass(frozen=True, kw_only=True)
class Deleted(Event):
    NAME: ClassVar[str] = "deleted"


@dataclass(frozen=True, kw_only=True)
class ResyncNeeded(Event):
    """The target can no longer follow the journal as it stands; ``cause`` is
    ``JOURNAL_LOST`` (journal/pairs.py) or the name of the error the applier met."""

    NAME: ClassVar[str] = "resync-needed"
    reason: str
    cause: str
    target: str | None = None               # set by an applier: the target it applies to
    lost_before_epoch: int | None = None    # set by a capturer that found the journal lost


@dataclass(frozen=True, kw_only=True)
class _Repaired(Event):
    """A target brought level with its source by comparing block hashes: ``differing``
    blocks were found, ``bytes_sent`` (hash map and resent data) sent for it."""

    target: str
    differing: int
    bytes_sent: int


@dataclass(frozen=True, kw_only=True)
class Resynced(_Repaired):
    """``x2x pair resync`` repaired the target; it follows ``epoch`` now."""

    NAME: ClassVar[str] = "resynced"
    epoch: int


@dataclass(frozen=True, kw_only=True)
class FailoverFailed(Event):
    """A planned failover gave up before promoting: the pair is as it was."""

    NAME: ClassVar[str] = "failover-failed"
    reason: str


@dataclass(frozen=True, kw_only=True)
class FailbackStarted(Event):
    NAME: ClassVar[str] = "failback-started"
    target: str


@dataclass(frozen=True, kw_only=True)
class FailbackDone(_Repaired):
    """The old source follows the promoted side's journal now."""

    NAME: ClassVar[str] = "failback-done"


@dataclass(frozen=True, kw_only=True)
class HistorySet(Event):
    """The pair keeps ``window_ms`` of history (None: forever) in at most ``journal_max``
    bytes of journal (None: no limit); journal/history.py."""

    NAME: ClassVar[str] = "history-set"
    window_ms: int | None = None
    journal_max: int | None = None


@dataclass(frozen=True, kw_only=True)
class AutoFailoverSet(Event):
    """Automatic failover: promote the target after ``after_ms`` of silence of the
    source, whose capturer holds a lease of ``lease_ms`` (journal/fencing.py); both
    None: off."""

    NAME: ClassVar[str] = "auto-failover-set"
    after_ms: int | None = None
    lease_ms: int | None = None


@dataclass(frozen=True, kw_only=True)
class GroupSet(Event):
    """The pair belongs to consistency group ``group`` from now on (None: to none);
    journal/groups.py."""

    NAME: ClassVar[str] = "group-set"
    group: str | None = None


@dataclass(frozen=True, kw_only=True)
class RateSet(Event):
    """The pair's link: at most ``max_rate`` (journal/rates.py: ``20Mbit``, ``pause``;
    None: unlimited) unless a rule of ``schedule`` matches; both None: no limit."""

    NAME: ClassVar[str] = "rate-set"
    max_rate: str | None = None
    schedule: str | None = None


# -- requests to a capturer and its answers ------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class _ToSource(Event):
    """A request to the capturer of ``source``, or its answer; ``request`` ties the two
    (None when the operator did the capturer's part itself, with no capturer to ask)."""

    source: str
    request: str | None = None


@dataclass(frozen=True, kw_only=True)
class FailoverRequested(_ToSource):
    """Start of a failover. Planned (not ``forced``): the capturer of ``source`` refuses
    writes and seals; forced: the source is lost and takes no part."""

    NAME: ClassVar[str] = "failover-requested"
    forced: bool


@dataclass(frozen=True, kw_only=True)
class Sealed(_ToSource):
    """The source refused writes at ``refused_at_ms`` and journaled SEAL at ``seq``."""

    NAME: ClassVar[str] = "sealed"
    epoch: int
    seq: int
    digest: bytes            # blake3 of the whole source volume at the SEAL
    refused_at_ms: int


@dataclass(frozen=True, kw_only=True)
class HashesRequested(_ToSource):
    NAME: ClassVar[str] = "hashes-requested"


@dataclass(frozen=True, kw_only=True)
class ResendRequested(_ToSource):
    NAME: ClassVar[str] = "resend-requested"
    extents: tuple[Extent, ...]


@dataclass(frozen=True, kw_only=True)
class _Placed(_ToSource):
    """Where a request's ops landed in the journal."""

    epoch: int
    first_seq: int          # first seq of the entry holding the first op
    offset: int             # topic offset of that entry (-1 if unknown)
    seq: int                # the FLUSH that ends them
    bytes: int              # record payload sent for them (hash map or resent data)


@dataclass(frozen=True, kw_only=True)
class HashesPublished(_Placed):
    NAME: ClassVar[str] = "hashes-published"


@dataclass(frozen=True, kw_only=True)
class Resent(_Placed):
    NAME: ClassVar[str] = "resent"


@dataclass(frozen=True, kw_only=True)
class RequestFailed(_ToSource):
    NAME: ClassVar[str] = "request-failed"
    reason: str


# -- what a capturer says about its journal ------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class BaselineComplete(Event):
    """A full baseline of ``epoch`` is in the journal: replay can build targets again."""

    NAME: ClassVar[str] = "baseline-complete"
    epoch: int


@dataclass(frozen=True, kw_only=True)
class EpochAbandoned(Event):
    """``epoch`` was given up for ``successor``: its late records are skipped."""

    NAME: ClassVar[str] = "epoch-abandoned"
    epoch: int
    successor: int


# -- what an applier says about its target -------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Promoted(Event):
    """``volume`` is the pair's source now, promoted at ``epoch``/``seq``."""

    NAME: ClassVar[str] = "promoted"
    volume: str
    epoch: int
    seq: int
    forced: bool
    rpo_s: float
    rpo_ops: int
    promoted_at_ms: int


@dataclass(frozen=True, kw_only=True)
class HashesCompared(Event):
    """An applier compared ``target`` with the HASHES of one consistency point."""

    NAME: ClassVar[str] = "hashes-compared"
    target: str
    epoch: int
    seq: int
    blocks: int
    differing: int
    extents: tuple[Extent, ...]
    truncated: bool         # ``extents`` was cut short to keep the event small


#: Every kind, by wire name.
KINDS: dict[str, type[Event]] = {k.NAME: k for k in (
    Created, Deleted, ResyncNeeded, Resynced, FailoverFailed, FailbackStarted, FailbackDone,
    HistorySet, AutoFailoverSet, RateSet, GroupSet,
    FailoverRequested, Sealed, HashesRequested, ResendRequested, HashesPublished, Resent,
    RequestFailed, BaselineComplete, EpochAbandoned, Promoted, HashesCompared)}

#: The requests a live NBD capturer serves (producers/control_watch.py).
REQUESTS: tuple[type[_ToSource], ...] = (FailoverRequested, HashesRequested, ResendRequested)
