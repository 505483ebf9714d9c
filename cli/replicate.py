"""x2x capture and x2x apply: the two services of a pair."""
from __future__ import annotations

import signal
import sys
import threading
import time

import typer
from rich.progress import (BarColumn, DownloadColumn, Progress, TimeRemainingColumn,
                           TransferSpeedColumn)

from cli.common import console, err_console, human_bytes, print_json, settings
from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control
from journal.errors import BadInput
from producers.scan import ScanResult, scan_once
from producers.state import StateStore


def _progress(enabled: bool) -> Progress:
    return Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                    disable=not enabled, transient=True)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def capture(ctx: typer.Context, name: str,
            once: bool = typer.Option(False, "--once", help="Scan once and exit (default)."),
            interval: float = typer.Option(0.0, help="Scan again every SECONDS, until stopped."),
            resync: bool = typer.Option(False, help="Forget the hash map: publish a full "
                                        "baseline in a new epoch."),
            json_: bool = typer.Option(False, "--json", help="Print results as JSON lines.")
            ) -> None:
    """Capture a pair's source into its journal by scanning for changed blocks."""
    if once and interval:
        raise BadInput("--once and --interval exclude each other: pick one")
    if interval < 0:
        raise BadInput(f"--interval must be positive, got {interval}")
    s = settings(ctx)
    spec = control.get_pair(s, name).spec
    store = StateStore(name)
    if resync:
        state, _ = store.load()
        if state:
            state.clean = False
            store.save(state)
        store.hashes.unlink(missing_ok=True)
    stop = _stop_on_signals()
    while True:
        show = not json_ and sys.stderr.isatty()
        with _progress(show) as bar:
            task = bar.add_task("scanning", total=spec.volume_size)
            result = scan_once(spec, s, store, progress=lambda n: bar.advance(task, n))
        _print_scan(result, json_)
        if not interval or stop.wait(interval):
            return


def _print_scan(r: ScanResult, json_: bool) -> None:
    if json_:
        print_json(r.__dict__)
        return
    kind = "baseline" if r.baseline else "incremental scan"
    rate = r.bytes_sent / r.seconds / 1e6 if r.seconds else 0.0
    console.print(
        f"{kind}: epoch {r.epoch} seq {r.first_seq}..{r.last_seq}; {r.blocks_changed} of "
        f"{r.blocks_scanned} blocks changed ({human_bytes(r.bytes_changed)}); sent "
        f"{human_bytes(r.bytes_sent)} to the journal in {r.seconds:.2f} s ({rate:.0f} MB/s)")


def apply(ctx: typer.Context, name: str,
          target: str = typer.Option(None, help="Target volume (default: the pair's target)."),
          until_caught_up: bool = typer.Option(False, help="Exit once every consistency "
                                               "point the capturer journaled is applied."),
          reset: bool = typer.Option(False, help="Forget this target's checkpoint and replay "
                                     "the journal from its start."),
          json_: bool = typer.Option(False, "--json", help="Print the result as JSON.")) -> None:
    """Apply a pair's journal to its target, from the target's checkpoint."""
    s = settings(ctx)
    spec = control.get_pair(s, name).spec
    target = target or spec.target
    store = CheckpointStore(name, target)
    if reset:
        store.reset()
    applier = Applier(spec, target, s, store=store)
    stop = _stop_on_signals()
    stats = applier.run(until_caught_up=until_caught_up, stop=stop)
    p = applier.checkpointed
    if json_:
        print_json({**stats.__dict__, "epoch": p.epoch, "seq": p.seq, "offset": p.offset})
        return
    rate = stats.bytes_applied / stats.seconds / 1e6 if stats.seconds else 0.0
    console.print(
        f"applied {stats.entries} entries, {stats.ops} ops, {human_bytes(stats.bytes_applied)} "
        f"in {stats.seconds:.2f} s ({rate:.0f} MB/s); checkpoint epoch {p.epoch} seq {p.seq} "
        f"(offset {p.offset})")


