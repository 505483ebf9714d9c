"""x2x replica add: another target built by replaying the journal (live or point-in-time)."""
from __future__ import annotations

import typer

from cli.common import console, disk_share, human_bytes, print_json, settings
from cli.replicate import _stop_on_signals
from consumers import replica
from consumers.seed import find_base, register
from infra import control
from infra.keys import key_for, remember_file

app = typer.Typer(help="Build extra replicas, live or at a point in time.",
                  no_args_is_help=True)


@app.command()
def add(ctx: typer.Context, name: str,
        target: str = typer.Option(..., help="The replica's volume (an image file is created "
                                   "sparse if missing)."),
        at: str = typer.Option(None, help="Stop at the last consistency point at or before "
                               "this time (ISO-8601 or 'now')."),
        seq: str = typer.Option(None, help="... at or before EPOCH:SEQ (or SEQ of epoch 1)."),
        offset: int = typer.Option(None, help="... at or before this journal offset."),
        key_file: str = typer.Option(None, help="The pair's key file, if it is encrypted."),
        reseed: bool = typer.Option(False, "--reseed", help="Start again from a copy of the "
                                    "history base (a replica that fell behind it)."),
        base: str = typer.Option(None, help="The history base's volume (default: the base "
                                 "running on this host)."),
        json_: bool = typer.Option(False, "--json")) -> None:
    """Replay the pair's journal onto TARGET: live-following until stopped, or up to a point.
    Once history has left the journal, the replica starts from a copy of the history base."""
    s = settings(ctx)
    remember_file(key_file)
    st = control.get_pair(s, name)
    spec = st.spec
    limit = replica.make_limit(s, name, at, seq, offset)
    origin = None
    if reseed or replica.needs_seed(s, st, target):
        origin = base or find_base(s, name)
    applier, stats = replica.build(spec, target, s, limit, stop=_stop_on_signals(),
                                   key=key_for(spec, key_file), origin=origin)
    p = applier.checkpointed
    if json_:
        print_json({**stats.__dict__, "target": target, "epoch": p.epoch, "seq": p.seq,
                    "offset": p.offset, "captured_at_ms": p.captured_at_ms})
        return
    console.print(f"replica {target}: {stats.entries} entries, "
                  f"{human_bytes(stats.bytes_applied)} in {stats.seconds:.2f} s "
                  f"({disk_share(stats)}); at consistency "
                  f"point epoch {p.epoch} seq {p.seq} (offset {p.offset}); stopped by "
                  f"{stats.stopped_by}")


@app.command()
def release(ctx: typer.Context, name: str,
            target: str = typer.Option(..., help="The replica that no longer follows.")
            ) -> None:
    """Tell the history base that TARGET needs none of the journal any more (a replica
    given up); until then a stopped replica holds the journal at its checkpoint for the
    reader TTL. It can come back later with 'x2x replica add NAME --target T --reseed'."""
    s = settings(ctx)
    control.get_pair(s, name)
    register(s, name, target, None, state="released")
    console.print(f"{target} released: the history base no longer keeps pair {name}'s "
                  f"journal for it", highlight=False)
