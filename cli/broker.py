"""x2x broker up|run|down|status: the embedded Tansu broker."""
from __future__ import annotations

import typer

from cli.common import console, print_json
from infra import broker

app = typer.Typer(help="Run the embedded Kafka-compatible broker (Tansu) on 127.0.0.1.",
                  no_args_is_help=True)

_PORT = typer.Option(broker.DEFAULT_PORT, help="TCP port on 127.0.0.1.")
_STORAGE = typer.Option(None, help=f"Tansu storage engine URL (default "
                        f"{broker.MEMORY_STORAGE}).")
_DURABLE = typer.Option(False, "--durable", help="Keep journals across restarts: Tansu on "
                        "S3 storage in a local SeaweedFS under $X2X_HOME/broker/seaweedfs.")


@app.command()
def up(port: int = _PORT, storage: str = _STORAGE, durable: bool = _DURABLE) -> None:
    """Start the broker in the background (does nothing if it runs already)."""
    state = broker.up(port, storage, durable=durable)
    extra = f", S3 {state.s3_endpoint}" if state.s3_endpoint else ""
    console.print(f"broker up at [bold]{state.bootstrap}[/] (pid {state.pid}, storage "
                  f"{state.storage}{extra}, log {state.log})")


@app.command()
def run(port: int = _PORT, storage: str = _STORAGE, durable: bool = _DURABLE) -> None:
    """Run the broker in the foreground until SIGTERM or Ctrl-C (for systemd)."""
    broker.run(port, storage, durable=durable)


@app.command()
def down() -> None:
    """Stop the broker. With memory storage its journals are gone afterwards."""
    console.print("broker stopped" if broker.down() else "no embedded broker was running")


@app.command()
def status(json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show whether the broker runs, and where."""
    state = broker.status()
    if json_:
        print_json(state.__dict__ if state else {"running": False})
    elif state:
        console.print(f"running at {state.bootstrap} (pid {state.pid}, storage {state.storage})")
    else:
        console.print("not running; start it with 'x2x broker up'")
        raise typer.Exit(3)
