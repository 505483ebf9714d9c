"""The x2x command line: one sub-app per noun, each thin; errors print as one line."""
from __future__ import annotations

import sys

import typer

from cli import (access, base, broker, cutover, group, journal, pair, replica, replicate,
                 status, volume, watch)
from cli.common import Globals, err_console
from infra import logs, telemetry
from journal.errors import X2XError

app = typer.Typer(help="x2x: continuous block-volume replication and migration on Kafka.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(broker.app, name="broker")
app.add_typer(access.app, name="access")
app.add_typer(pair.app, name="pair")
app.add_typer(group.app, name="group")
app.add_typer(replica.app, name="replica")
app.add_typer(volume.app, name="volume")
app.add_typer(journal.app, name="journal")
app.command()(replicate.capture)
app.command()(replicate.apply)
app.command()(base.base)
app.command()(watch.watch)
app.command()(status.status)
app.command()(cutover.cutover)
app.command(name="nbd-certs")(replicate.nbd_certs)


@app.callback()
def main_options(
    ctx: typer.Context,
    bootstrap: str = typer.Option(None, envvar="X2X_BOOTSTRAP",
                                  help="Kafka bootstrap servers (default: the embedded broker)."),
    kafka_config: str = typer.Option(None, envvar="X2X_KAFKA_CONFIG",
                                     help="librdkafka properties file (TLS, SASL)."),
    compression: str = typer.Option(None, envvar="X2X_COMPRESSION",
                                    help="Kafka's compression of journal records, CODEC[:LEVEL]: "
                                    "zstd:1 (default), lz4, zstd:3, gzip, none..."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens, "
                                 "librdkafka included."),
    log_format: str = typer.Option("text", envvar="X2X_LOG_FORMAT",
                                   help="Log lines as text or json (one object per line)."),
    telemetry_: str = typer.Option(None, "--telemetry", envvar="X2X_TELEMETRY",
                                   help="Metrics and traces: otlp, console or none (default: "
                                   "otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set)."),
) -> None:
    logs.setup(verbose, log_format)
    ctx.obj = Globals(bootstrap, kafka_config, compression)
    telemetry.setup(telemetry_)
    ctx.call_on_close(telemetry.current().shutdown)


def main() -> None:
    try:
        app()
    except X2XError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)
