"""x2x volume digest: what operators compare source and target with."""
from __future__ import annotations

import typer

from cli.common import console
from infra.volumes import volume_digest

app = typer.Typer(help="Inspect volumes.", no_args_is_help=True)


@app.command()
def digest(path: str, length: int = typer.Option(None, help="Only the first LENGTH bytes.")
           ) -> None:
    """Print the blake3 digest of a volume (raw file, block device, disk image such as
    disk.qcow2, or NBD URI)."""
    console.print(f"{volume_digest(path, length).hex()}  {path}", highlight=False)
