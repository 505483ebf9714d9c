"""x2x status: one table of every pair, joined from heartbeats."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cli.common import console, human_bytes, print_json, settings
from infra import control, telemetry
from infra.heartbeat import BeatTail, read_beats, read_local_beats
from journal.errors import BadInput, BrokerError, X2XError
from journal.linkstate import LinkState, link_state
from journal.pairs import PairState
from journal.fencing import failover_status
from journal.status import (FLUSH_SHOWN_S, PairStatus, ReplicaStatus, latest, newest,
                            pair_status)
from journal.clock import now_ms


def status(ctx: typer.Context, name: str = typer.Argument(None, help="Only this pair."),
           json_: bool = typer.Option(False, "--json", help="Print JSON."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until Ctrl-C."),
           interval: float = typer.Option(2.0, help="Seconds between --watch refreshes.")
           ) -> None:
    """Show per pair: captured seq, applied seq, lag in ops and bytes, RPO. Lag and RPO
    count every write a client was told is done and a target does not have, journaled
    or not; the RPO is the age of the oldest of them (at most)."""
    if watch:
        return watch_status(ctx, name, json_, interval)
    _show(ctx, name, json_)


def _show(ctx: typer.Context, name: str | None, json_: bool,
          tail: BeatTail | None = None) -> None:
    """One frame of ``x2x status``; ``tail``: the heartbeats as a watch follows them."""
    s = settings(ctx)
    try:
        pairs = control.pairs(s)
    except BrokerError as e:
        _local_fallback(e, name, json_)
        raise
    if name:
        pairs = {name: control.get_pair(s, name)}
    specs = {n: p.spec for n, p in pairs.items()}
    beats = tail.latest(specs) if tail else latest(read_beats(s, specs))
    now = now_ms()
    rows = [pair_status(p, beats, now) for p in sorted(pairs)]
    links = {p: link_state(newest(beats.values(), p, "capturer"), now) for p in pairs}
    m = telemetry.metrics()      # with --watch and an exporter, x2x status exports lag/RPO
    for r in rows:
        for rep in r.replicas:
            m.lag(r.pair, rep.lag_ops, rep.lag_bytes, rep.rpo_s, target=rep.target)
    if json_:
        print_json([{**r.as_dict(), "state": pairs[r.pair].state,
                     "history_window_ms": pairs[r.pair].history.window_ms,
                     "history_warnings": history_warnings(r, pairs[r.pair]),
                     "auto_failover": _failover(pairs[r.pair], beats.values(), now),
                     "link": asdict(links[r.pair])}
                    for r in rows])
        return
    table = Table("pair", "state", "capture", "link", "captured", "target", "applied",
                  "lag ops", "lag bytes", "RPO s", "rate")
    for r in rows:
        cap = f"{r.captured_epoch}:{r.captured_seq}"
        capture = _capture_cell(r.capture_state, r.capture_detail)
        link = link_cell(links[r.pair])
        if not r.replicas:
            table.add_row(r.pair, pairs[r.pair].state, capture, link, cap, "-", "-", "-",
                          "-", "-", "-")
        for rep in r.replicas:
            table.add_row(r.pair, pairs[r.pair].state, capture, link, cap, rep.target,
                          _applied_cell(rep),
                          _opt(rep.lag_ops), _opt(rep.lag_bytes, human_bytes),
                          _opt(rep.rpo_s, lambda v: f"{v:.1f}"),
                          f"{human_bytes(rep.rate_bps)}/s")
    console.print(table)
    _history_table(rows, pairs, now)
    _failover_table(pairs, beats.values(), now)


def _failover(st: PairState, beats, now: int) -> dict | None:
    return failover_status(st.auto, st.spec.name, st.active_spec.source, beats, now)


def _failover_table(pairs: dict[str, PairState], beats, now: int) -> None:
    shown = {n: _failover(p, beats, now) for n, p in pairs.items() if p.auto}
    if not shown:
        return
    table = Table("pair", "after", "lease", "source", "watcher", "failover in", "why",
                  title="automatic failover")
    for name, a in shown.items():
        lease = (f"{a['source_lease_ms'] / 1000:g} s held" if a["source_lease_ms"] else
                 "NOT HELD")
        source = f"{a['source_state'] or '-'}, {lease}"
        ws = a["watchers"] or [None]
        for w in ws:
            table.add_row(name, f"{a['after_ms'] / 1000:g} s", f"{a['lease_ms'] / 1000:g} s",
                          source, "none running" if w is None else
                          f"{w['host']} {w['state']} ({w['seen_s_ago']:.0f} s ago)",
                          "-" if w is None or w["failover_in_s"] is None
                          else f"{w['failover_in_s']} s",
                          "" if w is None else w["reason"][:80])
    console.print(table)


def history_warnings(r: PairStatus, st: PairState) -> list[str]:
    """What an operator must know about a pair's bounded journal."""
    h, want = r.history, st.history
    if not want.bounded:
        return []
    if h is None:
        return [f"pair {r.pair} has a history window but no history base runs: its journal "
                f"grows without bound; start one with 'x2x base {r.pair} --volume PATH'"]
    out = []
    if h.shrunk:
        actual = "?" if h.actual_ms is None else format_age(h.actual_ms)
        out.append(f"the journal is over its limit ({want.describe()}): the history base "
                   f"applies early and the window is down to {actual}; writes on the source "
                   f"go on. Give the journal more room, a shorter --history, or find what "
                   f"writes so much")
    if h.holding:
        out.append(f"{h.holding} keeps journal records below the base (it lags, or "
                   f"stopped); the journal holds more than the window until it catches up "
                   f"or its registration expires")
    if h.seen_s_ago > 120:
        out.append(f"the history base {h.base} has not reported for {h.seen_s_ago:.0f} s")
    return out


def _history_table(rows: list[PairStatus], pairs: dict[str, PairState], now: int) -> None:
    shown = [r for r in rows if pairs[r.pair].history.bounded or r.history is not None]
    if not shown:
        return
    table = Table("pair", "window", "actual", "held (payload)", "offsets", "oldest restorable",
                  "base", title="history")
    warnings = []
    for r in shown:
        h = r.history
        want = pairs[r.pair].history
        if h is None:
            table.add_row(r.pair, want.describe(), "-", "-", "-", "-", "no base running")
        else:
            table.add_row(
                r.pair, want.describe(), _opt(h.actual_ms, format_age),
                _opt(h.held_payload, human_bytes), f"{h.low}..{h.high}",
                _opt(h.restorable_ms, lambda ms: f"{_utc(ms)} ({format_age(now - ms)} ago)"),
                f"{h.base} ({h.state})")
        warnings += history_warnings(r, pairs[r.pair])
    console.print(table)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)


def format_age(ms: int) -> str:
    s = ms / 1000
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _local_fallback(error: BrokerError, name: str | None, json_: bool) -> None:
    """The broker is unreachable: show what the capturers of this host last said (a
    degraded capturer is then the news), then let the error end the command."""
    beats = [b for b in read_local_beats() if name is None or b.pair == name]
    if not beats:
        return
    now = now_ms()
    if json_:
        print_json({"error": str(error), "local_capturers": [
            {**asdict(b), "age_s": (now - b.at_ms) / 1000,
             "link": asdict(link_state(b, now))} for b in beats]})
        return
    table = Table("pair", "capture", "link", "captured", "source", "as of")
    for b in beats:
        table.add_row(b.pair, _capture_cell(b.state, b.detail),
                      link_cell(link_state(b, now)), f"{b.epoch}:{b.seq}",
                      b.instance, f"{(now - b.at_ms) / 1000:.0f} s ago")
    console.print("the broker cannot be reached; capturers on this host said:",
                  highlight=False)
    console.print(table)


def _capture_cell(state: str, detail: dict[str, str]) -> str:
    """The capture state, plus for a live (NBD) capturer its mode, clients and volume,
    for a trace capturer its cuts and freeze times."""
    if detail.get("capturer") == "trace":
        return f"{state} ({_trace_parts(detail)})"
    if detail.get("capturer") != "nbd":
        return state
    parts = [f"nbd {detail.get('mode', '?')}", f"{detail.get('clients', '?')} clients",
             f"{detail.get('captured_ops', '?')} ops",
             human_bytes(int(detail.get("captured_bytes", "0") or 0))]
    if detail.get("baseline", "done") != "done":
        parts.append(f"baseline {detail['baseline']}")
    if detail.get("resend", "done") != "done":
        parts.append(f"resend {detail['resend']}")
    spooled = int(detail.get("spooled_bytes", "0") or 0)
    if spooled:
        # Journal records queued on the source's disk for a broker slower than the writes.
        parts.append(f"{human_bytes(spooled)} spooled")
    deferred = int(detail.get("deferred_bytes", "0") or 0)
    if deferred:
        # Acknowledged writes the journal has yet to read back from the source.
        parts.append(f"{human_bytes(deferred)} held on the source")
    unjournaled = int(detail.get("unjournaled_bytes", "0") or 0)
    if unjournaled:
        # Everything acknowledged to clients the broker does not hold yet (held, queued,
        # spooled, in flight): counted in every target's lag and RPO.
        parts.append(f"{human_bytes(unjournaled)} not journaled yet")
    dirty = int(detail.get("dirty_bytes", "0") or 0)
    if dirty or state == "degraded":
        # Written on the source, not (yet) acknowledged by the broker: what a resync sends.
        parts.append(f"{human_bytes(dirty)} dirty")
    return f"{state} ({', '.join(parts)})"


def _trace_parts(detail: dict[str, str]) -> str:
    """A trace capturer (producers/trace.py): what it freezes, its cuts, freeze times,
    lost events, and what is marked and not yet read."""
    parts = [f"trace, freezing {detail['mount']}" if detail.get("mount", "-") != "-"
             else "trace, no freeze", f"{detail.get('cuts', '0')} cuts"]
    if detail.get("cuts_abandoned", "0") != "0":
        parts.append(f"{detail['cuts_abandoned']} abandoned")
    parts.append(f"freeze p50 {detail.get('freeze_p50_ms', '?')} ms, p99 "
                 f"{detail.get('freeze_p99_ms', '?')} ms, max "
                 f"{detail.get('freeze_max_ms', '?')} ms")
    for phase in ("baseline", "comparing"):
        if phase in detail:
            parts.append(f"{phase} {detail[phase]}")
    if detail.get("lost_events", "0") != "0":
        parts.append(f"{detail['lost_events']} trace events lost, "
                     f"{detail.get('compares', '?')} hash compares")
    dirty = int(detail.get("dirty_bytes", "0") or 0)
    if dirty:
        parts.append(f"{human_bytes(dirty)} marked")
    return ", ".join(parts)


def link_cell(link: LinkState) -> str:
    """``backlog (12 MiB behind, ETA 1m40s at 1.2 MiB/s, limit 10 Mbit/s)``."""
    parts = []
    if link.percent is not None:
        parts.append(f"{link.percent:.0f}%")
    if link.behind_bytes:
        parts.append(f"{human_bytes(link.behind_bytes)} behind")
    if link.state in ("initial-sync", "backlog"):
        parts.append("ETA " + ("none: growing" if link.eta_s is None else
                               format_age(int(link.eta_s * 1000))))
    if link.send_bps:
        parts.append(f"sending {human_bytes(link.send_bps)}/s")
    if link.limit != "unlimited":
        parts.append(f"limit {link.limit}")
    if link.why:
        parts.append(link.why[:80])
    return f"{link.state} ({', '.join(parts)})" if parts else link.state


def watch_status(ctx: typer.Context, name: str | None, json_: bool, interval: float) -> None:
    """``x2x status --watch``: show what one-shot ``x2x status`` prints, every ``interval``.

    The frame is rendered by :func:`_show`, as one-shot status renders it, so any column
    it shows appears here too; the heartbeats are followed by one consumer (BeatTail).
    On a terminal: a rich Live display redrawn in place. Off a terminal (a pipe,
    journald, CI) or with ``--json``: the plain output appended once per interval, each
    frame after a time-stamp line (JSON: one document per interval, a stream ``jq``
    reads), because cursor movement would garble a log. A broker or pair that cannot be
    read is shown as an error line and retried: a watch outlives a broker restart.
    Ctrl-C ends it with exit code 0.
    """
    if not interval > 0:
        raise BadInput(f"--interval must be a positive number of seconds, got {interval}")
    # One consumer follows the heartbeats for the whole watch, rather than one reading
    # the status topic from its start at every frame.
    with BeatTail(settings(ctx)) as tail:
        try:
            _watch(ctx, name, json_, interval, tail)
        except KeyboardInterrupt:
            pass


def _watch(ctx: typer.Context, name: str | None, json_: bool, interval: float,
           tail: BeatTail) -> None:
    if json_ or not console.is_terminal:
        while True:
            if not json_:
                console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}", highlight=False)
            _frame(ctx, name, json_, interval, tail)
            sys.stdout.flush()
            time.sleep(interval)
    # Live draws on its own console: the shared one is busy capturing each frame.
    with Live(console=Console(), auto_refresh=False, transient=False) as live:
        while True:
            with console.capture() as frame:
                _frame(ctx, name, False, interval, tail)
            live.update(Group(
                Text(f"x2x status at {time.strftime('%H:%M:%S')}, every {interval:g} s; "
                     f"Ctrl-C to stop", style="dim"),
                Text.from_ansi(frame.get())), refresh=True)
            time.sleep(interval)


def _frame(ctx: typer.Context, name: str | None, json_: bool, interval: float,
           tail: BeatTail) -> None:
    try:
        _show(ctx, name, json_, tail)
    except X2XError as e:
        if json_:
            print_json({"error": str(e)})
        else:
            console.print(f"error: {e} (retrying every {interval:g} s)", style="bold red",
                          highlight=False)


def _applied_cell(rep: ReplicaStatus) -> str:
    """The target's position and state, and its slowest recent flush when that is a
    cause of the RPO worth naming."""
    flush = rep.slowest_flush_s
    slow = f", flush {flush:.1f} s" if flush is not None and flush >= FLUSH_SHOWN_S else ""
    return f"{rep.applied_epoch}:{rep.applied_seq} ({rep.state}{slow})"


def _opt(value, fmt=str) -> str:
    return "?" if value is None else fmt(value)
