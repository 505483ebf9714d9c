"""x2x status: one table of every pair, joined from heartbeats."""
from __future__ import annotations

import time

import typer
from rich.table import Table

from cli.common import console, human_bytes, print_json, settings
from infra import control
from infra.heartbeat import read_beats
from journal.status import latest, pair_status


def status(ctx: typer.Context, name: str = typer.Argument(None, help="Only this pair."),
           json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show per pair: captured seq, applied seq, lag in ops and bytes, RPO."""
    s = settings(ctx)
    pairs = control.pairs(s)
    if name:
        pairs = {name: control.get_pair(s, name)}
    beats = latest(read_beats(s))
    now = int(time.time() * 1000)
    rows = [pair_status(p, beats, now) for p in sorted(pairs)]
    if json_:
        print_json([{**r.as_dict(), "state": pairs[r.pair].state} for r in rows])
        return
    table = Table("pair", "state", "capture", "captured", "target", "applied", "lag ops",
                  "lag bytes", "RPO s", "rate")
    for r in rows:
        cap = f"{r.captured_epoch}:{r.captured_seq}"
        if not r.replicas:
            table.add_row(r.pair, pairs[r.pair].state, r.capture_state, cap, "-", "-", "-", "-",
                          "-", "-")
        for rep in r.replicas:
            table.add_row(r.pair, pairs[r.pair].state, r.capture_state, cap, rep.target,
                          f"{rep.applied_epoch}:{rep.applied_seq} ({rep.state})",
                          _opt(rep.lag_ops), _opt(rep.lag_bytes, human_bytes),
                          _opt(rep.rpo_s, lambda v: f"{v:.1f}"),
                          f"{human_bytes(rep.rate_bps)}/s")
    console.print(table)


def _opt(value, fmt=str) -> str:
    return "?" if value is None else fmt(value)
