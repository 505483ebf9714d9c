"""The status record of a pair, joined from capturer and applier heartbeats.

Lag and RPO come from the journal's own seqs and capture times, never from a broker's
high watermark (which some Kafka-compatible brokers report wrongly).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable


#: A capturer beats this often: what it did after its last beat is unknown to the others.
CAPTURE_BEAT_S = 2.0


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
    lag_ops = lag_bytes = rpo = None
    if cap is not None:
        if app.epoch == cap.epoch:
            lag_ops = max(0, cap.seq - app.seq)
            lag_bytes = max(0, cap.epoch_bytes - app.epoch_bytes)
        elif app.epoch < cap.epoch:
            lag_ops, lag_bytes = cap.seq, cap.epoch_bytes  # all of the newer epoch
        appended = _num(cap.detail, "appended_seq")
        if lag_ops == 0 and not (appended and app.epoch == cap.epoch and appended > app.seq):
            rpo = 0.0
        elif lag_ops is not None:
            # The target reflects the source as of the last applied capture time.
            rpo = max(0.0, (now_ms - (app.captured_at_ms or app.at_ms)) / 1000)
    return ReplicaStatus(app.instance, app.state, app.epoch, app.seq, lag_ops, lag_bytes,
                         rpo, app.rate_bps, (now_ms - app.at_ms) / 1000)


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
