"""The state of a pair's link (source -> Kafka), from its capturer's newest heartbeat.

One word for what an operator wants to know first, and the figures behind it:

- ``initial-sync``: the baseline runs; ``percent`` read, ``eta_s`` until it and the
  backlog behind it are in the journal at the current send rate;
- ``continuous``: the journal keeps up (less than ``BACKLOG_S`` of sending behind);
- ``backlog``: ``behind_bytes`` written on the source and not yet acknowledged by the
  broker; ``eta_s`` at the current send rate less the rate clients add to it (None:
  the backlog grows);
- ``paused``: the pair's rate (``x2x pair rate``, its schedule) is ``pause`` now;
- ``stalled``: something is behind and nothing was acknowledged for ``STALLED_S``, or
  the capturer's heartbeats stopped arriving (a cut link looks like this from the
  broker's side);
- ``degraded``: the capturer's journal stopped taking writes (producers/health.py), or
  it fenced itself.

Pure: the capturer puts the figures in its heartbeat's detail (``unjournaled_bytes``,
the publisher's, is what is behind; ``sent_bps``, ``write_bps``, ``max_rate_bps``,
``progress_at_ms``, ``baseline_total``, ``baseline_done``); this decides.
"""
from __future__ import annotations

from dataclasses import dataclass

from journal.rates import format_rate
from journal.status import Beat

#: Nothing acknowledged for this long while something is behind: stalled.
STALLED_S = 15.0
#: No heartbeat for this long: the capturer (or its link) is silent. Many beats long: a
#: beat shares the capture's producer, so on a thin link it queues behind journal data.
SILENT_S = 10.0
#: Behind by less than this many seconds of sending (or 1 MiB): still continuous.
BACKLOG_S = 2.0
BACKLOG_MIN = 1 << 20


@dataclass(frozen=True)
class LinkState:
    state: str
    why: str = ""
    behind_bytes: int | None = None
    percent: float | None = None        # initial-sync: share of the baseline read
    eta_s: float | None = None          # until caught up, at the current rate
    send_bps: float | None = None       # record bytes handed to Kafka per second
    write_bps: float | None = None      # what clients add per second
    limit: str = "unlimited"            # the rate in force


def _int(d: dict[str, str], k: str) -> int | None:
    v = d.get(k, "")
    return int(v) if v.lstrip("-").isdigit() else None


def _float(d: dict[str, str], k: str) -> float | None:
    try:
        return float(d[k])
    except (KeyError, ValueError):
        return None


def eta(remaining: int, send_bps: float | None, write_bps: float | None) -> float | None:
    """Seconds until ``remaining`` bytes are sent at ``send_bps`` while clients add
    ``write_bps``; 0 when nothing remains, None when it does not shrink."""
    if remaining <= 0:
        return 0.0
    drain = (send_bps or 0.0) - (write_bps or 0.0)
    return remaining / drain if drain > 0 else None


def link_state(cap: Beat | None, now_ms: int) -> LinkState:
    """The link's state from the capturer's newest heartbeat (None: none seen)."""
    if cap is None:
        return LinkState("unknown", "no capturer seen")
    d = cap.detail
    raw_limit = _int(d, "max_rate_bps")
    limit = format_rate(raw_limit) if "max_rate_bps" in d else "unlimited"
    behind = _int(d, "unjournaled_bytes")
    send, write = _float(d, "sent_bps"), _float(d, "write_bps")
    figures = dict(behind_bytes=behind, send_bps=send, write_bps=write, limit=limit)
    if cap.state in ("degraded", "fenced"):
        return LinkState("degraded", d.get("error", cap.state), **figures)
    silent = (now_ms - cap.at_ms) / 1000
    if silent > SILENT_S and cap.state not in ("stopped", "sealed", "idle"):
        return LinkState("stalled", f"no heartbeat from the capturer for {silent:.0f} s",
                         **figures)
    if raw_limit == 0:
        return LinkState("paused", "the pair's rate is pause now", **figures)
    progress = _int(d, "progress_at_ms")
    if behind and progress is not None and (cap.at_ms - progress) / 1000 > STALLED_S:
        return LinkState("stalled", f"nothing acknowledged for "
                         f"{(cap.at_ms - progress) / 1000:.0f} s", **figures)
    total, done = _int(d, "baseline_total"), _int(d, "baseline_done")
    if cap.state == "baseline" and total:
        left = max(0, total - (done or 0)) + (behind or 0)
        return LinkState("initial-sync", "", percent=100.0 * (done or 0) / total,
                         eta_s=eta(left, send, write), **figures)
    if behind and behind > max(BACKLOG_MIN, BACKLOG_S * (send or 0.0)):
        return LinkState("backlog", "", eta_s=eta(behind, send, write), **figures)
    return LinkState("continuous", "", eta_s=0.0, **figures)
