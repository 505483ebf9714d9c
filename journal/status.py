"""The status record of a pair, joined from capturer and applier heartbeats.

Lag and RPO come from the journal's own seqs and capture times, never from a broker's
high watermark (which some Kafka-compatible brokers report wrongly). They are counted
from the client's point of view (journal/DESIGN.md rule 8): everything a client was told
is done and the target does not have yet, journaled or not (a burst held on the source,
the spool, records in flight), and the RPO is the age of the oldest such write.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


#: A capturer beats this often: what it did after its last beat is unknown to the others,
#: so this bounds how stale ``x2x status`` is and how loose a forced failover's RPO bound
#: is. Half a second: a small record per capture, against a bound of seconds at 2 s.
CAPTURE_BEAT_S = 0.5
#: An applier beats this soon after its checkpoint moves (else every 2 s): the RPO status
#: shows is then the target's, not the age of a beat.
APPLIED_BEAT_S = 0.25
#: How late the next beat may reach the broker and still count as on time: a loaded
#: capturer sends it late, and one killed just after sending may not have delivered it
#: (its producer lingers). A source silent for a beat plus this may have lived that long.
BEAT_LATE_S = 0.5
#: A capturer notes, at most this often, which seq its next append takes and when
#: (``SeqTimes``): the RPO of a target that lacks only ops appended after a note is at
#: most that note's age. Without them, a workload resuming after an idle hour showed an
#: RPO of an hour for as long as the target lagged by one op.
SEQ_TIME_EVERY_MS = 100
#: How many notes a beat carries: the newest, so at least 2.4 s of busy appends.
SEQ_TIMES = 24
#: An applier reports the slowest fsync of its target over this many seconds
#: (``flush_s`` in its beat): each checkpoint waits for one, so the RPO includes it.
FLUSH_WINDOW_S = 60.0
#: ``x2x status`` shows a target's slowest recent flush from this long: beside an RPO
#: of a second, it is then a cause worth naming (a disk shared with a busy broker, a
#: slow device).
FLUSH_SHOWN_S = 0.5


@dataclass(frozen=True)
class Beat:
    """One heartbeat, as published on ``x2x.status``."""

    pair: str
    role: str
    instance: str
    host: str
    pid: int
    at_ms: int
    state: str
    epoch: int
    seq: int
    epoch_bytes: int
    captured_at_ms: int
    rate_bps: float = 0.0
    detail: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaStatus:
    target: str
    state: str
    applied_epoch: int
    applied_seq: int
    lag_ops: int | None
    lag_bytes: int | None
    rpo_s: float | None
    rate_bps: float
    seen_s_ago: float
    detail: dict[str, str] = field(default_factory=dict)   # the applier's beat's

    @property
    def slowest_flush_s(self) -> float | None:
        """The slowest fsync of the target over the applier's last FLUSH_WINDOW_S
        seconds (None: its beat does not say)."""
        try:
            return float(self.detail["flush_s"])
        except (KeyError, ValueError):
            return None


class RecentMax:
    """The largest value noted over the last ``window`` seconds (e.g. the slowest
    target flush), keeping only the values that can still become the answer."""

    def __init__(self, window: float = FLUSH_WINDOW_S) -> None:
        self.window = window
        #: (time, value), times rising and values falling: a value with a larger one
        #: noted after it can never be the maximum again.
        self._kept: deque[tuple[float, float]] = deque()

    def note(self, value: float, at: float) -> None:
        """Note ``value`` at time ``at`` (seconds, rising)."""
        kept = self._kept
        while kept and kept[-1][1] <= value:
            kept.pop()
        kept.append((at, value))
        self._expire(at)

    def value(self, now: float) -> float:
        """The largest value noted after ``now - window`` (0.0: none)."""
        self._expire(now)
        return self._kept[0][1] if self._kept else 0.0

    def _expire(self, now: float) -> None:
        while self._kept and self._kept[0][0] < now - self.window:
            self._kept.popleft()


@dataclass(frozen=True)
class HistoryStatus:
    """What the pair's history base said in its newest beat (consumers/base.py)."""

    base: str                       # the base's volume
    state: str
    window_ms: int | None           # as the base applies it
    actual_ms: int | None           # age of the oldest record the journal holds
    held_payload: int | None        # journal payload bytes from its start to the head
    low: int                        # journal offsets held: low..high
    high: int
    restorable_ms: int | None       # capture time of the oldest point a replica can have
    holding: str                    # a reader keeping records below the base, if any
    seen_s_ago: float
    shrunk: bool = False            # over --journal-max: the base applied early


def _num(detail: dict[str, str], key: str) -> int | None:
    v = detail.get(key, "")
    return int(v) if v.lstrip("-").isdigit() else None


def history_status(base: Beat, now_ms: int) -> HistoryStatus:
    d = base.detail
    oldest = _num(d, "oldest_ms")
    return HistoryStatus(base.instance, base.state, _num(d, "window_ms"),
                         None if oldest is None else max(0, now_ms - oldest),
                         _num(d, "held_payload"), _num(d, "low") or 0, _num(d, "high") or 0,
                         _num(d, "restorable_ms"), d.get("holding", ""),
                         (now_ms - base.at_ms) / 1000, d.get("shrunk") == "1")


@dataclass(frozen=True)
class PairStatus:
    pair: str
    capture_state: str
    captured_epoch: int
    captured_seq: int
    capture_rate_bps: float
    capture_seen_s_ago: float | None
    capture_detail: dict[str, str]
    replicas: list[ReplicaStatus]
    history: HistoryStatus | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class SeqTimes:
    """A capturer's notes of (seq, ms): every op after ``seq`` was appended at ``ms`` or
    later; one per ``SEQ_TIME_EVERY_MS`` at most, the newest ``SEQ_TIMES`` kept."""

    def __init__(self) -> None:
        self._notes: deque[tuple[int, int]] = deque(maxlen=SEQ_TIMES)
        self._last_ms = 0

    def note(self, before: int, at_ms: int) -> None:
        """An op after seq ``before`` is being appended at ``at_ms``."""
        if at_ms - self._last_ms >= SEQ_TIME_EVERY_MS:
            self._notes.append((before, at_ms))
            self._last_ms = at_ms

    def text(self) -> str:
        """As a beat's detail carries them: ``seq:ms`` pairs, oldest first."""
        return ",".join(f"{seq}:{ms}" for seq, ms in self._notes)


def seq_times(text: str | None) -> tuple[tuple[int, int], ...]:
    """The notes of a beat's detail (:meth:`SeqTimes.text`); () when absent or malformed
    (status is advisory: a bad detail loosens the RPO bound, it never fails)."""
    if not text:
        return ()
    try:
        notes = tuple((int(seq), int(ms)) for seq, ms in
                      (item.split(":") for item in text.split(",")))
    except ValueError:
        return ()
    return notes


def appended_after(notes: Iterable[tuple[int, int]], seq: int) -> int | None:
    """The latest time every op after ``seq`` is known to have been appended at or after
    (the note of the largest seq at or before it), or None."""
    return max((ms for at, ms in notes if at <= seq), default=None)


@dataclass(frozen=True)
class Acknowledged:
    """What a capturer's beat says its clients were told is done, journaled or not.

    From the beat's detail (producers/publisher.py); a capturer that does not say
    (an older one, or a bare journal position) counts as having journaled all of it."""

    epoch: int
    seq: int                    # the newest op appended (acknowledged to a client)
    epoch_bytes: int            # payload bytes appended in the epoch
    newest_ms: int              # capture time of the newest op appended
    journaled_seq: int          # what the broker had acknowledged
    unjournaled_since_ms: int   # capture time of the oldest op it had not (0: none)
    unjournaled_bytes: int
    #: In ``epoch``: (seq, ms), every op after seq appended at ms or later (SeqTimes).
    seq_times: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, beat: Beat) -> "Acknowledged":
        d = beat.detail
        seq = max(beat.seq, detail_int(d.get("appended_seq"), beat.seq))
        nbytes = max(beat.epoch_bytes, detail_int(d.get("appended_bytes"), beat.epoch_bytes))
        return cls(beat.epoch, seq, nbytes,
                   detail_int(d.get("appended_at_ms"), beat.captured_at_ms), beat.seq,
                   detail_int(d.get("unjournaled_since_ms"), 0),
                   detail_int(d.get("unjournaled_bytes"), nbytes - beat.epoch_bytes),
                   seq_times(d.get("seq_times")))

    @classmethod
    def journaled(cls, epoch: int, seq: int, epoch_bytes: int,
                  captured_at_ms: int) -> "Acknowledged":
        """A position the journal holds: acknowledged, and all of it journaled."""
        return cls(epoch, seq, epoch_bytes, captured_at_ms, seq, 0, 0)


@dataclass(frozen=True)
class Missing:
    """What a target lacks of what clients were told is done."""

    ops: int
    bytes: int
    #: A lower bound of the capture time of the oldest op it lacks (None: unknown, or
    #: nothing lacking): the RPO is at most the age of this time.
    since_ms: int | None

    def rpo_s(self, at_ms: int) -> float | None:
        """The RPO at ``at_ms``: the age of the oldest write the target lacks (0.0 when
        it lacks nothing known, None when that age is unknown)."""
        if not self.ops:
            return 0.0
        if self.since_ms is None:
            return None
        return max(0.0, (at_ms - self.since_ms) / 1000)


def missing(ack: Acknowledged, epoch: int, seq: int, epoch_bytes: int,
            captured_at_ms: int) -> Missing | None:
    """What a target at ``(epoch, seq, epoch_bytes)``, whose last applied entry was
    closed at ``captured_at_ms``, lacks of ``ack``; None when the target is in a newer
    epoch than the capturer said (nothing to compare).

    The oldest op lacking was appended after the entry the target ends at was closed, so
    no earlier than ``captured_at_ms``; if the target holds everything the broker had
    acknowledged at the beat, every op it lacks was unjournaled then, so no earlier than
    the oldest unjournaled op; and no earlier than the capturer's note of the last seq at
    or before the target's (``seq_times``). The latest of the bounds is taken."""
    if epoch == ack.epoch:
        ops, nbytes = max(0, ack.seq - seq), max(0, ack.epoch_bytes - epoch_bytes)
        held = seq
    elif epoch < ack.epoch:
        ops, nbytes = ack.seq, ack.epoch_bytes      # all of the newer epoch
        held = 0
    else:
        return None
    if not ops:
        return Missing(0, 0, None)
    bounds = [captured_at_ms] if captured_at_ms else []
    if (epoch, seq) >= (ack.epoch, ack.journaled_seq) and ack.unjournaled_since_ms:
        bounds.append(ack.unjournaled_since_ms)
    noted = appended_after(ack.seq_times, held)
    if noted is not None:
        bounds.append(noted)
    return Missing(ops, nbytes, max(bounds) if bounds else None)


@dataclass(frozen=True)
class Loss:
    """What a forced failover loses: the ops the promoted target lacks of what the
    source's clients were told is done, as far as the journal and the source's last
    heartbeat say."""

    epoch: int                  # the newest epoch known (the promotion records it)
    ops: int
    rpo_s: float                # age of the oldest op lost when the source was last heard
    #: The most it can be: the source may have taken writes after its last heartbeat,
    #: until the next one was due; None when no beat was ever seen.
    rpo_max_s: float | None


def forced_loss(beat: Beat | None, applied_epoch: int, applied_seq: int,
                applied_bytes: int, applied_ms: int, read: Acknowledged) -> Loss:
    """The loss of a target promoted at its checkpoint ``applied_*``, with ``read`` the
    newest position the journal held (what a forced failover drained), and ``beat`` the
    source's last heartbeat."""
    ack = read
    if beat is not None:
        said = Acknowledged.of(beat)
        if (said.epoch, said.seq) > (read.epoch, read.seq):
            ack = said
    m = missing(ack, applied_epoch, applied_seq, applied_bytes, applied_ms) or Missing(
        0, 0, None)
    heard = max(beat.at_ms if beat is not None else 0, ack.newest_ms)
    rpo = m.rpo_s(heard) or 0.0
    if beat is None:
        return Loss(max(ack.epoch, applied_epoch), m.ops, rpo, None)
    if beat.state in ("stopped", "sealed"):
        bound: float | None = rpo       # it stopped: the journal has what it took
    else:
        since = m.since_ms if m.ops else applied_ms
        seen_until = beat.at_ms + int((CAPTURE_BEAT_S + BEAT_LATE_S) * 1000)
        bound = max(rpo, (seen_until - since) / 1000) if since else None
    return Loss(max(ack.epoch, applied_epoch), m.ops, rpo, bound)


def detail_int(text: str | None, default: int = 0) -> int:
    """A number a heartbeat's detail carries, or ``default`` if absent or not a number."""
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def latest(beats: Iterable[Beat]) -> dict[tuple[str, str, str], Beat]:
    """The newest beat per (pair, role, instance)."""
    out: dict[tuple[str, str, str], Beat] = {}
    for b in beats:
        key = (b.pair, b.role, b.instance)
        if key not in out or out[key].at_ms <= b.at_ms:
            out[key] = b
    return out


def newest(beats: Iterable[Beat], pair: str, role: str,
           instance: str | None = None) -> Beat | None:
    """The newest beat of ``pair``'s ``role`` (on ``instance``, if given), or None."""
    found = [b for b in beats if b.pair == pair and b.role == role
             and (instance is None or b.instance == instance)]
    return max(found, key=lambda b: b.at_ms) if found else None


def replica_status(cap: Beat | None, app: Beat, now_ms: int) -> ReplicaStatus:
    """Lag and RPO of the target an applier beat describes, against what the capturer's
    clients were told is done (:func:`missing`)."""
    lag_ops = lag_bytes = rpo = None
    m = (missing(Acknowledged.of(cap), app.epoch, app.seq, app.epoch_bytes,
                 app.captured_at_ms) if cap is not None else None)
    if m is not None:
        lag_ops, lag_bytes, rpo = m.ops, m.bytes, m.rpo_s(now_ms)
    return ReplicaStatus(app.instance, app.state, app.epoch, app.seq, lag_ops, lag_bytes,
                         rpo, app.rate_bps, (now_ms - app.at_ms) / 1000, dict(app.detail))


def pair_status(pair: str, beats: dict[tuple[str, str, str], Beat], now_ms: int) -> PairStatus:
    """Join the newest heartbeats of ``pair`` into one status record."""
    caps = [b for (p, r, _), b in beats.items() if p == pair and r == "capturer"]
    cap = max(caps, key=lambda b: b.at_ms) if caps else None
    apps = [b for (p, r, _), b in beats.items() if p == pair and r == "applier"]
    bases = [b for (p, r, _), b in beats.items() if p == pair and r == "base"]
    base = max(bases, key=lambda b: b.at_ms) if bases else None
    return PairStatus(
        pair=pair,
        capture_state=cap.state if cap else "no capturer seen",
        captured_epoch=cap.epoch if cap else 0,
        captured_seq=cap.seq if cap else 0,
        capture_rate_bps=cap.rate_bps if cap else 0.0,
        capture_seen_s_ago=(now_ms - cap.at_ms) / 1000 if cap else None,
        capture_detail=dict(cap.detail) if cap else {},
        replicas=[replica_status(cap, a, now_ms) for a in sorted(apps, key=lambda b: b.instance)],
        history=history_status(base, now_ms) if base is not None else None,
    )
