"""x2x journal check: replay a pair's journal into a scratch image and fsck every
consistency point (the logic is in consumers/check.py)."""
from __future__ import annotations

import typer
from rich.table import Table

from cli.common import console, err_console, human_bytes, print_json, settings
from consumers import check
from infra import control
from infra.keys import key_for, remember_file
from journal.pairs import parse_size

app = typer.Typer(help="Inspect and check a pair's journal.", no_args_is_help=True)


@app.command("check")
def check_cmd(ctx: typer.Context, name: str,
              fsck: bool = typer.Option(False, "--fsck", help="Run fsck.ext4 -fn on the "
                                        "replayed image at every consistency point."),
              target_size: str = typer.Option(None, help="Scratch image size (default: the "
                                              "pair's volume size), e.g. 1GiB."),
              scratch_dir: str = typer.Option(None, help="Where the scratch image goes "
                                              "(default: $TMPDIR); needs room for the data "
                                              "the journal holds."),
              key_file: str = typer.Option(None, help="The pair's key file, if it is "
                                           "encrypted (default $X2X_HOME/keys/NAME.key)."),
              verbose_points: bool = typer.Option(False, "--points", help="List every "
                                                  "point, not only the unclean ones."),
              json_: bool = typer.Option(False, "--json", help="Print the report as JSON.")
              ) -> None:
    """Replay NAME's whole journal into a scratch image and check every consistency point.

    Exits 0 when every point is clean (points before mkfs count as not-a-filesystem, not
    as failures), 3 when any point is unclean or no point holds a filesystem."""
    s = settings(ctx)
    remember_file(key_file)
    spec = control.get_pair(s, name).spec
    size = parse_size(target_size) if target_size else None
    show_progress = not json_ and err_console.is_terminal

    def progress(p: check.PointResult) -> None:
        if show_progress:
            err_console.print(f"  point {p.index + 1}: {p.epoch}:{p.seq} {p.verdict}",
                              highlight=False)

    report = check.check_journal(spec, s, fsck=fsck, target_size=size,
                                 scratch_dir=scratch_dir, key=key_for(spec, key_file),
                                 on_point=progress)
    if json_:
        print_json(report.as_dict(with_points=verbose_points))
    else:
        _print(report, verbose_points)
    check.raise_if_failed(report)


def _print(r: check.CheckReport, all_points: bool) -> None:
    console.print(
        f"pair {r.pair}: replayed {r.entries} entries ({human_bytes(r.bytes_applied)}) from "
        f"{r.topic} in {r.seconds:.1f} s; {r.points_checked} consistency points", highlight=False)
    if not r.fsck:
        return
    console.print(
        f"fsck.ext4 -fn: {r.clean} clean, {len(r.unclean)} unclean, {r.not_a_filesystem} not "
        f"yet a filesystem (before mkfs); {r.journal_replayed} needed their ext4 journal "
        f"replayed first", highlight=False)
    rows = r.points if all_points else r.unclean
    if not rows:
        return
    table = Table("#", "epoch:seq", "offset", "verdict", "fsck exit", "first lines")
    for p in rows:
        table.add_row(str(p.index + 1), f"{p.epoch}:{p.seq}", str(p.offset), p.verdict,
                      "" if p.exit_code is None else str(p.exit_code),
                      "\n".join(p.first_lines))
    console.print(table)
