"""x2x pair create|list|show|delete: pairs are events on the control topic."""
from __future__ import annotations

from dataclasses import asdict

import typer
from rich.table import Table

from cli.common import console, human_bytes, print_json, settings
from infra import control
from infra.keys import key_for_create
from infra.volume import volume_size
from journal.errors import VolumeError
from journal.pairs import PairSpec, parse_size, validate_block_size, validate_name

app = typer.Typer(help="Create, list, show and delete replication pairs.", no_args_is_help=True)


@app.command()
def create(ctx: typer.Context, name: str,
           source: str = typer.Option(..., help="Source volume: image file or block device."),
           target: str = typer.Option(..., help="Target volume: image file or block device."),
           block_size: str = typer.Option("64KiB", help="Block size for hashing and baseline."),
           create_target: bool = typer.Option(False, help="Create the target image file, "
                                              "sparse, of the source's size if it is missing."),
           key_file: str = typer.Option(None, help="Encrypt and authenticate the journal with "
                                        "this key (32 bytes; generated, mode 0600, if missing)."),
           encrypt: bool = typer.Option(False, help="Like --key-file, with a key generated at "
                                        "$X2X_HOME/keys/NAME.key."),
           ) -> None:
    """Create a pair and its journal topic x2x.journal.NAME."""
    validate_name(name)
    bs = validate_block_size(parse_size(block_size))
    size = volume_size(source)
    if size == 0:
        raise VolumeError(f"source {source} is empty; nothing to replicate")
    if create_target:
        _create_sparse(target, size)
    tsize = volume_size(target)
    if tsize < size:
        raise VolumeError(f"target {target} is {tsize} bytes, smaller than source {source} "
                          f"({size} bytes); grow it with 'truncate -s {size} {target}'")
    key = key_for_create(name, key_file, encrypt)
    spec = PairSpec(name, source, target, bs, size, key.key_id if key else "")
    control.create_pair(settings(ctx), spec)
    console.print(f"pair [bold]{name}[/]: {source} -> {target}, {human_bytes(size)}, "
                  f"block {human_bytes(bs)}; journal x2x.journal.{name}"
                  + (f"; encrypted, key id {key.key_id}" if key else ""))


def _create_sparse(path: str, size: int) -> None:
    import os
    if os.path.exists(path):
        return
    with open(path, "wb") as f:
        f.truncate(size)


@app.command("list")
def list_(ctx: typer.Context, json_: bool = typer.Option(False, "--json")) -> None:
    """List pairs."""
    pairs = control.pairs(settings(ctx))
    if json_:
        print_json([{**asdict(p.spec), "state": p.state} for p in pairs.values()])
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
    value = {**asdict(p.spec), "state": p.state, "created_at_ms": p.created_at_ms,
             "journal_topic": f"x2x.journal.{name}", "attrs": p.attrs}
    if json_:
        print_json(value)
        return
    for k, v in value.items():
        console.print(f"[bold]{k}[/]: {v}")


@app.command()
def delete(ctx: typer.Context, name: str) -> None:
    """Delete a pair and its journal topic (volumes are left untouched)."""
    control.delete_pair(settings(ctx), name)
    console.print(f"pair {name} deleted")
