"""x2x pair create|list|show|delete: pairs are events on the control topic."""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from cli.common import console, err_console, human_bytes, print_json, settings
from infra import control, images, pins
from producers.resync import LocalCapture
from infra.keys import key_for_create, lookup, remember_file, retire_key
from infra.topics import journal_topic
from journal.errors import BadInput, VolumeError
from journal.history import HistorySettings
from journal.pairs import PairSpec, parse_size, validate_block_size, validate_name

if TYPE_CHECKING:
    from consumers.failover import Operation

app = typer.Typer(help="Create, list, show and delete replication pairs.", no_args_is_help=True)


@app.command()
def create(ctx: typer.Context, name: str,
           source: str = typer.Option(..., help="Source volume: raw image file, block "
                                      "device, or NBD URI (nbd://HOST:PORT/EXPORT, nbds:// "
                                      "for TLS; scan capture only)."),
           target: str = typer.Option(..., help="Target volume: raw image file, block "
                                      "device, disk image (.qcow2 .vmdk .vhdx .vdi .vhd, "
                                      "written through a qemu-nbd x2x runs), or NBD URI."),
           target_format: str = typer.Option(None, "--target-format", metavar="FORMAT",
                                             help="raw, qcow2, vmdk, vhdx, vdi or vhd "
                                             "(default: from the target's extension)."),
           block_size: str = typer.Option("64KiB", help="Block size for hashing and baseline."),
           create_target: bool = typer.Option(False, help="Create the target, of the "
                                              "source's size, if it is missing: a sparse "
                                              "raw file, or an empty image (qemu-img)."),
           key_file: str = typer.Option(None, help="Encrypt and authenticate the journal with "
                                        "this key (32 bytes; generated, mode 0600, if missing)."),
           encrypt: bool = typer.Option(False, help="Like --key-file, with a key generated at "
                                        "$X2X_HOME/keys/NAME.key."),
           history: str = typer.Option(None, help="Keep this much history in the journal "
                                       "(e.g. 24h, 7d; default: forever); older records go "
                                       "to a history base ('x2x base NAME --volume PATH')."),
           journal_max: str = typer.Option(None, help="Hard limit of the journal's size "
                                           "(e.g. 50GiB); needs --history."),
           ) -> None:
    """Create a pair and its journal topic x2x.journal.NAME."""
    validate_name(name)
    window = HistorySettings.parse(history, journal_max)
    bs = validate_block_size(parse_size(block_size))
    src = images.locate(source)
    size = images.size(src)
    if size == 0:
        raise VolumeError(f"source {source} is empty; nothing to replicate")
    dst = images.locate(target, target_format)
    target = dst.text
    images.check_format(dst)
    created = images.create(dst, size) if create_target else False
    try:    # nothing half-created: a target made here goes again if the pair is not made
        tsize = images.size(dst)
        if tsize < size:
            raise VolumeError(f"target {target} is {tsize} bytes, smaller than source {source} "
                              f"({size} bytes); {_grow_hint(dst, size)}")
        key = key_for_create(name, key_file, encrypt)
        spec = PairSpec(name, src.text, target, bs, size, key.key_id if key else "")
        control.create_pair(settings(ctx), spec, window)
    except BaseException:
        if created:
            os.unlink(dst.path)
        raise
    console.print(f"pair [bold]{name}[/]: {source} -> {target}, {human_bytes(size)}, "
                  f"block {human_bytes(bs)}; journal {journal_topic(name)}, history "
                  f"{window.describe()}" + (f"; encrypted, key id {key.key_id}" if key else ""))


@app.command("history")
def history_(ctx: typer.Context, name: str,
             history: str = typer.Option(..., help="The new window (e.g. 1h, 7d), or "
                                         "'forever' to keep the whole journal again."),
             journal_max: str = typer.Option(None, help="Hard limit of the journal's size "
                                             "(e.g. 10GiB).")) -> None:
    """Change a pair's history window; the history base follows at its next cycle."""
    window = HistorySettings.parse(history, journal_max)
    control.set_history(settings(ctx), name, window)
    console.print(f"pair {name}: history {window.describe()}"
                  + ("" if window.bounded else "; records already deleted stay deleted"),
                  highlight=False)


@app.command("auto-failover")
def auto_failover_(ctx: typer.Context, name: str,
                   after: str = typer.Option(None, help="Promote the target once the source "
                                             "is silent this long (e.g. 30s, 2m)."),
                   lease: str = typer.Option(None, help="The source's lease: it stops "
                                             "acknowledging writes once it could not renew "
                                             "it this long (default: --after less the "
                                             "margin)."),
                   off: bool = typer.Option(False, "--off", help="Failover is the "
                                            "operator's act again.")) -> None:
    """Enable (or turn off) automatic failover: 'x2x watch' on the target side promotes
    the target when the source is lost; the source fences itself first."""
    from journal.fencing import auto_failover, margin_ms
    from journal.history import parse_duration
    if off == (after is not None) or (off and lease is not None):
        raise BadInput("give --after [--lease], or --off")
    auto = None if off else auto_failover(
        parse_duration(after, "--after"),
        parse_duration(lease, "--lease") if lease is not None else None)
    if auto is not None:
        from journal.groups import check_alone
        st = control.get_pair(settings(ctx), name)
        check_alone(st, "x2x pair auto-failover", f"x2x group failover {st.group} --force")
    control.set_auto_failover(settings(ctx), name, auto)
    if auto is None:
        console.print(f"pair {name}: automatic failover off", highlight=False)
        return
    console.print(f"pair {name}: automatic failover after {auto.after_ms / 1000:g} s of "
                  f"silence; the source's lease is {auto.lease_ms / 1000:g} s (margin "
                  f"{margin_ms(auto.after_ms) / 1000:g} s); a running NBD capturer holds it at "
                  f"once. Run 'x2x watch {name}' on the target host instead of "
                  f"'x2x apply {name}'", highlight=False)


def _grow_hint(dst: images.Location, size: int) -> str:
    if dst.kind == "nbd":
        return "grow the export on its server, or choose a larger one"
    if dst.kind == "image":
        return f"grow it with 'qemu-img resize {dst.path} {size}'"
    if os.path.exists(dst.path) and not os.path.isfile(dst.path):
        return "choose a larger device"
    return f"grow it with 'truncate -s {size} {dst.path}'"


@app.command("rate")
def rate_(ctx: typer.Context, name: str,
          max_rate: str = typer.Option(None, "--max-rate", help="Most the source sends to "
                                       "Kafka (e.g. 20Mbit, 2MB, unlimited, pause): "
                                       "baseline, resends, verify and live writes alike."),
          rate_schedule: str = typer.Option(None, "--rate-schedule", help="Rules by the "
                                            "capturer's local time, first match wins, e.g. "
                                            "'Mon-Fri 08:00-18:00=10Mbit,*=unlimited'; "
                                            "--max-rate when none matches.")) -> None:
    """Limit (or, with neither option, unlimit) the bandwidth of a pair's link; a running
    capturer follows within a second."""
    from journal.rates import LinkLimit
    link = LinkLimit.parse(max_rate, rate_schedule)
    control.set_rate(settings(ctx), name, max_rate, rate_schedule)
    console.print(f"pair {name}: link {link.describe()}", highlight=False)


@app.command("list")
def list_(ctx: typer.Context, json_: bool = typer.Option(False, "--json")) -> None:
    """List pairs."""
    pairs = control.pairs(settings(ctx))
    if json_:
        print_json([{**asdict(p.spec), "state": p.state, "reversed": p.reversed}
                    for p in pairs.values()])
        return
    table = Table("pair", "source", "target", "size", "block", "state")
    for p in pairs.values():
        s = p.spec
        table.add_row(s.name, s.source, s.target, human_bytes(s.volume_size),
                      human_bytes(s.block_size), p.state)
    console.print(table)


@app.command()
def show(ctx: typer.Context, name: str, json_: bool = typer.Option(False, "--json")) -> None:
    """Show one pair."""
    p = control.get_pair(settings(ctx), name)
    # A keyed pair's events are checked only where its key is (docs/security.md).
    signed = ("no: the pair has no key" if not p.spec.key_id else
              "yes" if lookup(p.spec) else "NOT CHECKED: the pair's key is not on this host")
    value = {**asdict(p.spec), "state": p.state, "created_at_ms": p.created_at_ms,
             "reversed": p.reversed, "active_source": p.active_spec.source,
             "journal_topic": journal_topic(name), "history": p.history.describe(),
             "events_verified": signed, "reason": p.reason, "cause": p.cause,
             "promotion": asdict(p.promotion) if p.promotion else None,
             "auto_failover": asdict(p.auto) if p.auto else None,
             "link": p.link.describe()}
    if json_:
        print_json(value)
        return
    for k, v in value.items():
        console.print(f"[bold]{k}[/]: {v}")


@app.command()
def delete(ctx: typer.Context, name: str,
           key_file: str = typer.Option(None, help="The pair's key file, if encrypted and "
                                                   "not at the default path.")) -> None:
    """Delete a pair and its journal topic (volumes are left untouched); its key on this
    host is retired, so a new pair of the same name gets a new one."""
    remember_file(key_file)
    control.delete_pair(settings(ctx), name)
    pins.forget(name)
    retired = retire_key(name)
    console.print(f"pair {name} deleted" + (f"; its key was moved to {retired}"
                                            if retired else ""), highlight=False)


# -- failover, failback, verify: the steps live in consumers/failover.py; the capturer's
# part, when no NBD capturer serves the source, in producers/resync.LocalCapture ---------
def say(msg: str) -> None:
    """One dimmed progress line of an operator command, on stderr."""
    err_console.print(f"[dim]...[/] {msg}", highlight=False)


def operation(ctx: typer.Context, name: str, key_file: str | None, timeout: float,
               new_epoch: bool = False) -> Operation:
    """The command's context for consumers/failover.py: this host does the capturer's
    part (LocalCapture) when no live NBD capturer serves the source; ``new_epoch``: it
    starts a new epoch (the journal lost the old one)."""
    from consumers.failover import Operation
    from infra.keys import key_for
    s = settings(ctx)
    remember_file(key_file)
    key = key_for(control.get_pair(s, name).spec, key_file)
    return Operation(s, name, key, lambda st: LocalCapture(st, s, key, new_epoch=new_epoch),
                     say, timeout)


@app.command()
def failover(ctx: typer.Context, name: str,
             force: bool = typer.Option(False, "--force", help="The source is lost: promote "
                                        "the target at its last consistency point and report "
                                        "the RPO."),
             at: str = typer.Option(None, help="With --force: promote the last consistency "
                                    "point captured at or before this time (ISO-8601 or "
                                    "'now'), anywhere in the history window."),
             base: str = typer.Option(None, help="With --at: the history base's volume "
                                      "(default: the base running on this host)."),
             key_file: str = typer.Option(None, help="The pair's key file, if encrypted."),
             timeout: float = typer.Option(300.0, help="Seconds to wait for each step."),
             json_: bool = typer.Option(False, "--json")) -> None:
    """Promote the target: planned (source seals, target drains and is verified, RPO 0)
    or --force (source lost), optionally at an earlier point (--at)."""
    from consumers import failover as fo
    from consumers.replica import make_limit
    if (at is not None or base is not None) and not force:
        raise BadInput("--at and --base go with --force: a failover to an earlier point "
                       "gives up what the source wrote after it")
    from journal.groups import check_alone
    op = operation(ctx, name, key_file, timeout)
    st = control.get_pair(op.settings, name)
    check_alone(st, "x2x pair failover", f"x2x group failover {st.group}"
                + (" --force" if force else ""))
    limit = make_limit(op.settings, name, at, None, None)
    r = fo.force_failover(op, limit, base) if force else fo.failover(op)
    if json_:
        print_json(asdict(r))
        return
    for w in r.warnings:
        err_console.print(f"[yellow]warning:[/] {w}", highlight=False)
    if r.forced:
        console.print(f"promoted {r.promoted} (forced) at epoch {r.epoch} seq {r.seq}; "
                      f"RPO {r.rpo_s:.1f} s, {r.rpo_ops} ops lost", highlight=False)
        if r.rpo_max_s is None or r.rpo_max_s > r.rpo_s + 0.05:
            bound = "unknown" if r.rpo_max_s is None else f"at most {r.rpo_max_s:.2f} s"
            console.print(f"RPO bound: {bound} (writes the source acknowledged after its "
                          f"last heartbeat are unknown here)", highlight=False)
    else:
        console.print(f"promoted {r.promoted} at epoch {r.epoch} seq {r.seq}; digest verified "
                      f"{r.digest[:16]}...; downtime {r.downtime_s:.2f} s; RPO 0",
                      highlight=False)
    console.print(f"serve it with 'x2x capture {name} --nbd PORT'; when the old source is "
                  f"back, 'x2x pair failback {name}'", highlight=False)


@app.command()
def failback(ctx: typer.Context, name: str,
             key_file: str = typer.Option(None, help="The pair's key file, if encrypted."),
             timeout: float = typer.Option(300.0, help="Seconds to wait for each step."),
             json_: bool = typer.Option(False, "--json")) -> None:
    """Make the old source the target of the promoted side, sending only differing blocks."""
    from consumers import failover as fo
    r = fo.failback(operation(ctx, name, key_file, timeout))
    _print_resync(r, json_, f"failback done: the old source follows epoch {r.epoch} from seq "
                  f"{r.seq}; keep it following with 'x2x apply {name}'")


@app.command()
def verify(ctx: typer.Context, name: str,
           repair: bool = typer.Option(False, "--repair", help="Resend differing extents "
                                       "through the journal."),
           key_file: str = typer.Option(None, help="The pair's key file, if encrypted."),
           timeout: float = typer.Option(300.0, help="Seconds to wait for each step."),
           json_: bool = typer.Option(False, "--json")) -> None:
    """Compare source and target block hashes at one journal point, while replicating."""
    from consumers import failover as fo
    from journal.reports import Diverged
    r = fo.verify(operation(ctx, name, key_file, timeout), repair)
    _print_resync(r, json_, "repaired" if repair and r.differing else "")
    if r.differing and not repair:
        raise Diverged(f"pair {name}: {r.differing} blocks of the target differ from the "
                          f"source; run 'x2x pair verify {name} --repair' to resend them")


@app.command()
def resync(ctx: typer.Context, name: str,
           key_file: str = typer.Option(None, help="The pair's key file, if encrypted."),
           timeout: float = typer.Option(300.0, help="Seconds to wait for each step."),
           json_: bool = typer.Option(False, "--json")) -> None:
    """After the journal was lost: compare block hashes in a new epoch and resend only the
    blocks of the target that differ (no full copy)."""
    from consumers import failover as fo
    r = fo.resync(operation(ctx, name, key_file, timeout, new_epoch=True))
    _print_resync(r, json_, f"resynced: the target follows epoch {r.epoch} from seq {r.seq}; "
                  f"keep it following with 'x2x apply {name}'")


def _print_resync(r, json_: bool, done: str) -> None:
    if json_:
        print_json({**asdict(r), "bytes_sent": r.bytes_sent,
                    "extents": [[e.offset, e.length] for e in r.extents]})
        return
    console.print(f"at epoch {r.epoch} seq {r.seq}: {r.differing} of {r.blocks} blocks "
                  f"differ", highlight=False)
    for e in r.extents[:50]:
        console.print(f"  offset {e.offset} length {e.length}", highlight=False)
    if len(r.extents) > 50:
        console.print(f"  ... {len(r.extents) - 50} more extents", highlight=False)
    console.print(f"sent {human_bytes(r.bytes_sent)} (hash map {human_bytes(r.hash_bytes)}, "
                  f"resent {human_bytes(r.resent_bytes)})", highlight=False)
    if done:
        console.print(done, highlight=False)
