"""x2x group: consistency groups, several pairs (one per disk) that fail over as one."""
from __future__ import annotations

import sys
from dataclasses import asdict

import typer
from rich.table import Table

from cli.common import console, print_json, settings
from cli.pair import operation, say
from infra import control, pins
from infra.heartbeat import read_beats
from infra.keys import key_for, remember_file
from journal.clock import now_ms
from journal.errors import BadInput
from journal.groups import group_members, group_status
from journal.history import HistorySettings
from journal.plans import serving
from journal.status import latest, newest, pair_status

app = typer.Typer(help="Consistency groups: the disks of one server, failed over as one.",
                  no_args_is_help=True)


def _serving(ctx: typer.Context, name: str) -> bool:
    """Does a capturer serve this pair's source right now (its beats say so)?"""
    s = settings(ctx)
    st = control.get_pair(s, name)
    beat = newest(read_beats(s), name, "capturer", st.active_spec.source)
    return serving(beat, now_ms())


@app.command()
def create(ctx: typer.Context, name: str,
           pair: list[str] = typer.Option(..., "--pair", help="A pair of the group (one per "
                                          "disk); repeat for each.")) -> None:
    """Make a group of pairs (or add pairs to it): their targets then recover at the
    same group cut. Capture them together with 'x2x group capture NAME'."""
    control.set_group(settings(ctx), name, pair)
    members = group_members(control.pairs(settings(ctx)), name)
    console.print(f"group {name}: {', '.join(members)}; capture it with 'x2x group capture "
                  f"{name} --nbd PORT' (one export per pair, named after it)",
                  highlight=False)


@app.command()
def remove(ctx: typer.Context, name: str,
           pair: list[str] = typer.Option(..., "--pair", help="A pair to take out.")) -> None:
    """Take pairs out of a group (refused while the group's capture service runs)."""
    for p in pair:
        control.leave_group(settings(ctx), name, p, _serving(ctx, p) if _known(ctx, p)
                            else False)
        console.print(f"pair {p} left group {name}", highlight=False)


def _known(ctx: typer.Context, pair: str) -> bool:
    return pair in control.pairs(settings(ctx))


@app.command()
def delete(ctx: typer.Context, name: str) -> None:
    """Dissolve a group: its pairs stay and replicate on their own."""
    members = _members(ctx, name)
    live = [p for p in members if _serving(ctx, p)]
    if live:                # refused before any pair leaves
        control.leave_group(settings(ctx), name, live[0], True)
    for p in members:
        control.leave_group(settings(ctx), name, p, False)
    console.print(f"group {name} dissolved; {', '.join(members)} replicate on their own",
                  highlight=False)


def _members(ctx: typer.Context, name: str) -> list[str]:
    from consumers.group import members_of
    return list(members_of(settings(ctx), name))


@app.command("list")
def list_(ctx: typer.Context, json_: bool = typer.Option(False, "--json")) -> None:
    """Groups and their pairs."""
    pairs = control.pairs(settings(ctx))
    groups = {g: group_members(pairs, g) for g in sorted({p.group for p in pairs.values()
                                                           if p.group})}
    if json_:
        print_json(groups)
        return
    for g, members in groups.items():
        console.print(f"{g}: {', '.join(members)}", highlight=False)


@app.command()
def status(ctx: typer.Context, name: str, json_: bool = typer.Option(False, "--json")) -> None:
    """Each member's capture and target, the group cut, the group's RPO."""
    s = settings(ctx)
    states = {n: control.get_pair(s, n) for n in _members(ctx, name)}
    beats, now = latest(read_beats(s)), now_ms()
    g = group_status(name, {n: pair_status(n, beats, now) for n in states},
                     {n: st.active_spec.target for n, st in states.items()})
    if json_:
        print_json({**asdict(g), "rpo_s": g.rpo_s, "cut": g.cut})
        return
    t = Table(title=f"group {name}")
    for col in ("pair", "capture", "committed cut", "target at cut", "RPO"):
        t.add_column(col)
    for m in g.members:
        t.add_row(m.pair, m.capture_state, str(m.committed_cut or "-"),
                  str(m.target_cut or "-"), "?" if m.rpo_s is None else f"{m.rpo_s:.1f} s")
    console.print(t)
    console.print(f"group RPO: {'unknown' if g.rpo_s is None else f'{g.rpo_s:.1f} s'}; "
                  f"every target at cut {g.cut or 'none yet'}", highlight=False)


@app.command()
def capture(ctx: typer.Context, name: str,
            nbd: str = typer.Option(..., "--nbd", metavar="[HOST:]PORT|PATH",
                                    help="Serve every pair's source over NBD on this address "
                                    "(export name = pair name) and journal every write."),
            mode: str = typer.Option("async", "--mode", metavar="async|flush-sync|sync",
                                     help="What a client waits for (see 'x2x capture')."),
            cut_interval: float = typer.Option(
                0.5, "--cut-interval", metavar="SECONDS",
                help="Seconds between group cuts: the group's recovery points."),
            key_file: list[str] = typer.Option(None, "--key-file", help="A pair's key file "
                                               "if encrypted (default $X2X_HOME/keys/PAIR.key)."),
            json_: bool = typer.Option(False, "--json")) -> None:
    """The capture service of a group: one NBD server with one export per pair, and group
    cuts across all their journals; until SIGTERM/SIGINT."""
    from cli.replicate import _stop_on_signals
    from producers.direction import prepare_capture
    from producers.group import GroupCapture
    from producers.journaling import Mode
    from producers.nbd_capture import NBDCapture, listen_nbd, parse_listen
    if not 0.05 <= cut_interval <= 3600:
        raise BadInput(f"--cut-interval must be seconds from 0.05 to 3600, got {cut_interval:g}")
    listen = parse_listen(nbd)
    mode_ = Mode.parse(mode)
    s = settings(ctx)
    for f in key_file or []:
        remember_file(f)
    states = {n: control.get_pair(s, n) for n in _members(ctx, name)}
    for st in states.values():
        pins.check(st.spec, False)
    stop = _stop_on_signals()
    server = listen_nbd(listen)
    members: list[NBDCapture] = []
    try:
        for n, st in states.items():
            spec = st.active_spec
            store = prepare_capture(st, False)
            members.append(NBDCapture(spec, s, listen.host, server.port, mode_, store,
                                      key_for(spec, None), cut_interval=0,
                                      shared_server=server, path=listen.path).start())
    except BaseException:
        for m in members:
            m.stop()
        server.stop()
        raise
    g = GroupCapture(name, members, cut_interval).start()
    uris = [m.uri for m in members]
    if json_:
        print_json({"event": "serving", "group": name, "uris": uris, "mode": mode_.value})
    else:
        console.print(f"group {name}: serving {', '.join(uris)} ({mode_.value} mode); a group "
                      f"cut every {cut_interval:g} s; stop with SIGTERM or Ctrl-C",
                      highlight=False)
    sys.stdout.flush()
    g.serve(stop)
    reports = g.stop()
    clean = all(r.clean for r in reports)
    if json_:
        print_json({"event": "stopped", "group": name, "cuts": g.cuts,
                    "committed": g.committed, "clean": clean})
    else:
        console.print(f"group {name} stopped ({'clean' if clean else 'UNCLEAN'}): {g.cuts} "
                      f"cuts, the last committed {g.committed}", highlight=False)


@app.command()
def failover(ctx: typer.Context, name: str,
             force: bool = typer.Option(False, "--force", help="The source server is lost: "
                                        "promote every target at the newest group cut all "
                                        "the journals hold."),
             at: str = typer.Option(None, help="With --force: the newest group cut at or "
                                    "before this time (ISO-8601)."),
             base: str = typer.Option(None, help="With --at: the history base's volume."),
             key_file: list[str] = typer.Option(None, "--key-file", help="A pair's key file, "
                                                "if encrypted."),
             timeout: float = typer.Option(300.0, help="Seconds to wait for each step."),
             json_: bool = typer.Option(False, "--json")) -> None:
    """Promote every pair of the group at one consistency point: planned (each sealed and
    verified, RPO 0) or --force (at the newest group cut; one RPO for the group)."""
    from consumers import group as grp
    from consumers.replica import parse_at
    if (at is not None or base is not None) and not force:
        raise BadInput("--at and --base go with --force: a failover to an earlier point "
                       "gives up what the source wrote after it")
    for f in key_file or []:
        remember_file(f)
    at_ms = parse_at(at) if at is not None else None
    r = grp.failover(settings(ctx), name, lambda n: operation(ctx, n, None, timeout), force,
                     at_ms, base, say=say)
    if json_:
        print_json({**asdict(r), "cut_time": r.cut_time})
        return
    for m in r.members:
        console.print(f"  {m.pair}: promoted {m.promoted} at epoch {m.epoch} seq {m.seq}"
                      + (f", RPO {m.rpo_s:.1f} s" if r.forced else ""), highlight=False)
    if r.forced:
        bound = ("unknown" if r.rpo_max_s is None else f"at most {r.rpo_max_s:.2f} s")
        console.print(f"group {name} promoted (forced) at group cut {r.cut} ({r.cut_time}); "
                      f"RPO {r.rpo_s:.1f} s (bound: {bound})", highlight=False)
    else:
        console.print(f"group {name} promoted (planned): every disk sealed and verified; RPO 0",
                      highlight=False)


@app.command()
def replica(ctx: typer.Context, name: str,
            target_dir: str = typer.Option(..., "--target-dir", help="Where the replicas go, "
                                           "one per pair: DIR/PAIR.img (sparse if missing)."),
            at: str = typer.Option(None, help="The group as it was at the newest group cut "
                                   "at or before this time (ISO-8601 or 'now'); default: "
                                   "follow live until SIGTERM/SIGINT."),
            key_file: list[str] = typer.Option(None, "--key-file", help="A pair's key file, "
                                               "if encrypted."),
            timeout: float = typer.Option(300.0, help="Seconds to read the journals."),
            json_: bool = typer.Option(False, "--json")) -> None:
    """Extra replicas of every disk of the group, consistent with each other: at one group
    cut (--at), or following live, each at the group's committed cuts."""
    from cli.replicate import _stop_on_signals
    from consumers import group as grp
    from consumers.replica import parse_at
    s = settings(ctx)
    for f in key_file or []:
        remember_file(f)
    keys = {n: key_for(control.get_pair(s, n).spec, None) for n in _members(ctx, name)}
    at_ms = parse_at(at) if at is not None else None
    cut, stats = grp.replicas(s, name, target_dir, keys, at_ms, timeout,
                              None if at_ms is not None else _stop_on_signals())
    if json_:
        print_json({"group": name, "cut": cut, "replicas": {n: asdict(x)
                                                             for n, x in stats.items()}})
        return
    for n, x in stats.items():
        console.print(f"  {n}: {x.entries} entries applied; stopped by {x.stopped_by}",
                      highlight=False)
    console.print(f"group {name}: replicas in {target_dir}"
                  + (f" at group cut {cut}" if cut else ""), highlight=False)


@app.command()
def verify(ctx: typer.Context, name: str,
           repair: bool = typer.Option(False, "--repair"),
           timeout: float = typer.Option(300.0, help="Seconds to wait for each step.")) -> None:
    """Compare every member's source and target block hashes (pair by pair)."""
    from consumers import failover as fo
    bad = 0
    for n in _members(ctx, name):
        r = fo.verify(operation(ctx, n, None, timeout), repair)
        bad += r.differing
        console.print(f"  {n}: {r.blocks} blocks compared, {r.differing} differ"
                      + (" (resent)" if repair and r.differing else ""), highlight=False)
    if bad and not repair:
        from journal.reports import Diverged
        raise Diverged(f"group {name}: {bad} blocks differ; run 'x2x group verify {name} "
                       f"--repair' to resend them")


@app.command()
def failback(ctx: typer.Context, name: str,
             timeout: float = typer.Option(300.0, help="Seconds to wait for each step.")) -> None:
    """After a group failover: make every old source follow its promoted side."""
    from consumers import failover as fo
    for n in _members(ctx, name):
        r = fo.failback(operation(ctx, n, None, timeout))
        console.print(f"  {n}: the old source follows epoch {r.epoch} from seq {r.seq} "
                      f"({r.differing} blocks differed)", highlight=False)


@app.command()
def history(ctx: typer.Context, name: str,
            history: str = typer.Option(..., help="The window (e.g. 1h, 7d) or 'forever'."),
            journal_max: str = typer.Option(None, help="Each journal's hard size limit.")
            ) -> None:
    """Set the history window of every pair of the group (a group's points in time are
    its cuts, so its window is one)."""
    window = HistorySettings.parse(history, journal_max)
    for n in _members(ctx, name):
        control.set_history(settings(ctx), n, window)
    console.print(f"group {name}: history {window.describe()}", highlight=False)
