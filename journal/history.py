"""The bounded journal: a pair's history window, and which records may leave Kafka.

A pair keeps its journal forever unless it has a history window. With one, a *history
base* (consumers/base.py) applies every consistency point once it is older than the
window, and records are then deleted from the journal below the offset
:func:`deletable_below` decides. The rules are written out in journal/DESIGN.md
("Bounded journal"); this module holds them as pure functions, so they are tested
without a broker.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from journal.errors import BadInput
from journal.units import parse_size
from journal.ops import Entry
from journal.status import Beat

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: The window a user may choose: Zerto's range is 1 hour to 30 days; shorter windows
#: are allowed down to one second for tests and drills, longer ones are refused
#: because a window of months is a backup, not a journal.
MIN_WINDOW_MS, MAX_WINDOW_MS = 1000, 30 * 86_400_000
#: Below this a journal limit cannot hold even one 4 MiB record batch next to the window.
MIN_JOURNAL_MAX = 16 << 20
#: A reader that has not beaten for this long no longer holds the journal: the status
#: topic forgets a silent service after the same 24 hours (infra/topics.py).
READER_TTL_MS = 24 * 3_600_000
#: Segment sizes of a windowed journal: Kafka frees disk only by whole segments, so
#: they must be small next to the window for the disk to follow the deletions.
MIN_SEGMENT, MAX_SEGMENT, DEFAULT_SEGMENT = 1 << 20, 1 << 30, 64 << 20


def parse_duration(text: str, what: str = "--history") -> int:
    """``24h``, ``30m``, ``7d``, ``90s``, ``1500ms`` (no unit: seconds) -> milliseconds."""
    m = _DURATION.match(text)
    if not m:
        raise BadInput(f"{what} {text!r} is not a duration: use a number with a unit, "
                       f"e.g. 90s, 30m, 24h or 7d")
    return int(float(m.group(1)) * _MS[(m.group(2) or "s").lower()])


def format_duration(ms: int) -> str:
    """The shortest exact spelling: 86400000 -> '24h', 1500 -> '1500ms'."""
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _MS[unit] == 0:
            return f"{ms // _MS[unit]}{unit}"
    return f"{ms}ms"


def format_size(n: int) -> str:
    """The largest exact binary unit, as --journal-max takes it: 50GiB, 1536MiB, 1000B."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n}B"


@dataclass(frozen=True)
class HistorySettings:
    """A pair's history window and journal limit; ``window_ms=None``: keep forever."""

    window_ms: int | None = None
    journal_max: int | None = None

    @property
    def bounded(self) -> bool:
        return self.window_ms is not None

    @staticmethod
    def parse(history: str | None, journal_max: str | None) -> "HistorySettings":
        """From ``--history`` and ``--journal-max``; ``forever`` (or none) keeps all."""
        window = None
        if history is not None and history.strip().lower() not in ("forever", "none", ""):
            window = parse_duration(history)
            if not MIN_WINDOW_MS <= window <= MAX_WINDOW_MS:
                raise BadInput(f"--history {history} is outside 1s..30d; choose a window in "
                               f"that range, or 'forever' to keep the whole journal")
        limit = None
        if journal_max is not None and journal_max.strip().lower() not in ("none", ""):
            limit = parse_size(journal_max)
            if limit < MIN_JOURNAL_MAX:
                raise BadInput(f"--journal-max {journal_max} is below 16MiB; a journal needs "
                               f"room for its window and a few 4 MiB records")
        if limit is not None and window is None:
            raise BadInput("--journal-max bounds a history window: give --history too "
                           "(e.g. --history 24h --journal-max 50GiB)")
        return HistorySettings(window, limit)

    def describe(self) -> str:
        if self.window_ms is None:
            return "forever"
        text = format_duration(self.window_ms)
        return text + (f", max {format_size(self.journal_max)}" if self.journal_max else "")

    @property
    def segment_bytes(self) -> int:
        """Kafka segment size for this journal: a sixteenth of the limit, so deleting
        below the base frees disk in steps small next to it."""
        if self.journal_max is None:
            return DEFAULT_SEGMENT
        return max(MIN_SEGMENT, min(MAX_SEGMENT, self.journal_max // 16))


def base_cut_ms(now_ms: int, settings: HistorySettings) -> int | None:
    """The base applies consistency points captured at or before this time (None: the
    pair keeps its whole journal, the base applies nothing)."""
    if settings.window_ms is None:
        return None
    return now_ms - settings.window_ms


#: Over its limit, the base applies early until the journal above it holds this share of
#: the limit: room for the writes of a few cycles, so it does not apply early every cycle.
EARLY_SHARE = 0.8


@dataclass
class BaseLimit:
    """Where the history base stops this cycle (an Applier limit: the applier stops
    before the first entry that exceeds it and drops an unfinished consistency point, so
    only whole consistency points are applied).

    A consistency point has left the window when its closing entry was captured at or
    before ``cut_ms``. With ``keep_bytes`` (the journal is over its limit) the base also
    applies early, one whole consistency point after another, as long as more than
    ``keep_bytes`` of payload of the capturer's epoch lie from the point's first entry to
    the head: afterwards at most ``keep_bytes`` remain above the base. The window shrinks;
    the source is never held back. Asked about every entry in journal order, it
    remembers whether the point in hand was begun early."""

    cut_ms: int
    head_epoch: int = 0
    head_epoch_bytes: int = 0
    keep_bytes: int | None = None
    _early: bool = field(default=False, compare=False, repr=False)

    def exceeded_by(self, entry: Entry, offset: int) -> bool:
        exceeded = entry.captured_at_ms > self.cut_ms and not self._early_ok(entry)
        if not exceeded and self.keep_bytes is not None:
            self._early = not entry.closes_consistency_point
        return exceeded

    def _early_ok(self, entry: Entry) -> bool:
        if self.keep_bytes is None or entry.epoch > self.head_epoch:
            return False
        if self._early or entry.epoch < self.head_epoch:
            return True               # the point in hand, or an older epoch: all of it
        from_here = self.head_epoch_bytes - (entry.epoch_bytes - entry.payload_bytes)
        return from_here > self.keep_bytes


def base_limit(now_ms: int, settings: HistorySettings, held: int | None, head_epoch: int,
               head_epoch_bytes: int) -> BaseLimit | None:
    """This cycle's limit of the base; None when the pair keeps its whole journal.
    ``held``: payload bytes the journal holds (a lower bound will do)."""
    cut = base_cut_ms(now_ms, settings)
    if cut is None:
        return None
    limit = settings.journal_max
    if limit is None or held is None or held <= limit:
        return BaseLimit(cut)
    return BaseLimit(cut, head_epoch, head_epoch_bytes, int(limit * EARLY_SHARE))


@dataclass(frozen=True)
class Reader:
    """An applier or replica as its newest heartbeat registers it: it still needs
    every record from ``needs`` on (its checkpoint's record, which it reads again at its
    next start to prove the journal still holds it). ``needs=None``: released (a
    point-in-time replica that reached its point)."""

    instance: str
    needs: int | None
    seen_ms: int


def deletable_below(base_offset: int, readers: Iterable[Reader], low: int, now_ms: int,
                    reader_ttl_ms: int = READER_TTL_MS) -> int:
    """The offset below which records may be deleted from the journal (DeleteRecords
    keeps the record at that offset); never below ``low``, the journal's current start.

    - Nothing without a base checkpoint (``base_offset < 0``): the oldest record kept
      must always be replayable onto something.
    - Never above the base's checkpoint: the base reads its checkpoint's record again at
      its next start, and a replica seeded from the base replays from it.
    - Never above what a registered reader still needs; a reader silent for longer than
      ``reader_ttl_ms`` is no longer registered (it gets BehindBase when it returns).
    """
    if base_offset < 0:
        return low
    bound = base_offset
    for r in readers:
        if r.needs is not None and now_ms - r.seen_ms <= reader_ttl_ms:
            bound = min(bound, max(r.needs, 0))
    return max(low, bound)


@dataclass(frozen=True)
class Mark:
    """A record of the journal as seen by a reader: where it is and what it carries."""

    offset: int
    epoch: int
    epoch_bytes: int          # payload bytes of its epoch up to and including it
    payload: int              # its own payload bytes
    captured_at_ms: int


def held_payload(oldest: Mark | None, head_epoch: int, head_epoch_bytes: int) -> int | None:
    """Journal payload bytes from the oldest record kept to the capturer's head: exact
    inside one epoch, unknown (None) when the kept records span epochs."""
    if oldest is None:
        return 0
    if oldest.epoch != head_epoch:
        return None
    return max(0, head_epoch_bytes - oldest.epoch_bytes + oldest.payload)


def oldest_restorable_ms(low: int, first: Mark | None, base: Mark | None) -> int | None:
    """The capture time of the oldest consistency point a replica can be built at: the
    journal's first record while nothing was deleted (replay from offset 0), the base's
    checkpoint once records were (seed from the base, replay from there)."""
    if low <= 0:
        return first.captured_at_ms if first is not None else None
    return base.captured_at_ms if base is not None else None


def readers_of(beats: Iterable[Beat], pair: str) -> list[Reader]:
    """The registered readers of ``pair``'s journal: every applier and replica, as its
    newest heartbeat says. A beat without ``needs`` (an x2x from before history windows)
    holds the whole journal: its checkpoint's offset is unknown."""
    newest: dict[str, Beat] = {}
    for b in beats:
        if b.pair == pair and b.role == "applier":
            if b.instance not in newest or newest[b.instance].at_ms <= b.at_ms:
                newest[b.instance] = b
    out = []
    for b in newest.values():
        raw = b.detail.get("needs")
        needs = 0 if raw is None else (int(raw) if raw.lstrip("-").isdigit() else None)
        out.append(Reader(b.instance, needs, b.at_ms))
    return out
