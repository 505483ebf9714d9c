"""x2x base: the history base of a pair, the volume that follows its history window."""
from __future__ import annotations

import typer

from cli.common import console, settings
from cli.replicate import _stop_on_signals
from consumers.base import HistoryBase
from consumers.seed import seed
from infra import control
from infra.keys import key_for
from journal.history import READER_TTL_MS, parse_duration


def base(ctx: typer.Context, name: str,
         volume: str = typer.Option(..., help="The base's volume (an image file is created "
                                    "sparse, of the pair's size, if missing)."),
         seed_from: str = typer.Option(None, help="First make the base a copy of this "
                                       "volume at its checkpoint (a stopped target), when "
                                       "the base is new or lost and the journal's start is "
                                       "gone."),
         reader_ttl: str = typer.Option(None, help="A reader silent this long no longer "
                                        "holds the journal (default 24h, the status "
                                        "topic's memory)."),
         interval: float = typer.Option(None, help="Seconds between cycles (default: a "
                                        "tenth of the window, 0.5-30 s)."),
         key_file: str = typer.Option(None, help="The pair's key file, if it is encrypted."),
         ) -> None:
    """Run the history base of NAME: apply what leaves the window, delete what nobody
    needs from the journal, until SIGTERM/SIGINT."""
    s = settings(ctx)
    st = control.get_pair(s, name)
    if seed_from:
        cp = seed(st.spec, seed_from, volume, s, reader=False)
        console.print(f"base {volume} seeded from {seed_from} at epoch {cp.position.epoch} "
                      f"seq {cp.position.seq}", highlight=False)
    ttl = parse_duration(reader_ttl, "--reader-ttl") if reader_ttl else READER_TTL_MS
    service = HistoryBase(st.spec, volume, s, key=key_for(st.spec, key_file),
                          reader_ttl_ms=ttl, interval=interval)
    console.print(f"history base of {name} on {volume}: history {st.history.describe()}; "
                  f"stop with SIGTERM or Ctrl-C", highlight=False)
    service.run(_stop_on_signals())
    last = service.reports[-1] if service.reports else None
    if last is not None:
        console.print(f"stopped: base at epoch {last.position.epoch} seq {last.position.seq} "
                      f"(offset {last.position.offset}); journal holds offsets {last.low}.."
                      f"{last.high}", highlight=False)
