"""x2x broker fetch|up|run|down|status|node: the broker x2x runs itself on 127.0.0.1."""
from __future__ import annotations

import typer

from cli.common import console, print_json
from infra import apache_kafka, broker

app = typer.Typer(help="Run a broker on 127.0.0.1: Apache Kafka (durable, the default) or "
                       "Tansu (memory, for quick trials).", no_args_is_help=True)
node_app = typer.Typer(help="Stop or start one node of a local Apache Kafka cluster "
                            "(rolling restarts, fault drills).", no_args_is_help=True)
app.add_typer(node_app, name="node")

_PORT = typer.Option(broker.DEFAULT_PORT, help="TCP port on 127.0.0.1 (node N of a "
                     "cluster listens on PORT+N-1).")
_ENGINE = typer.Option(broker.DEFAULT_ENGINE, help="kafka: Apache Kafka (KRaft), log on "
                       "disk under $X2X_HOME/broker/kafka. tansu: Tansu, in memory unless "
                       "--durable, for quick trials.")
_NODES = typer.Option(1, help="kafka: 1 node, or 3 (journals RF=3, min.insync.replicas=2).")
_AUTH = typer.Option(None, help="kafka: 'scram' makes clients log in (SASL/SCRAM) and "
                     "enforces ACLs; the admin's settings go to $X2X_HOME/broker/kafka/"
                     "admin.properties. Fixed when the cluster is first made.")
_STORAGE = typer.Option(None, help=f"tansu: storage engine URL (default "
                        f"{broker.MEMORY_STORAGE}).")
_DURABLE = typer.Option(False, "--durable", help="tansu: keep journals across restarts on "
                        "S3 storage in a local SeaweedFS under $X2X_HOME/broker/seaweedfs.")


@app.command()
def fetch() -> None:
    """Fetch the pinned Apache Kafka broker's jars with Maven, once (make setup does it)."""
    libs = apache_kafka.fetch()
    console.print(f"Apache Kafka broker jars in {libs}")


@app.command()
def up(port: int = _PORT, engine: str = _ENGINE, nodes: int = _NODES, auth: str = _AUTH,
       storage: str = _STORAGE, durable: bool = _DURABLE) -> None:
    """Start the broker in the background (does nothing if it runs already)."""
    state = broker.up(port, storage, durable=durable, engine=engine, nodes=nodes, auth=auth)
    extra = f", S3 {state.s3_endpoint}" if state.s3_endpoint else ""
    console.print(f"broker up at [bold]{state.bootstrap}[/] ({state.engine}, "
                  f"{state.nodes} node(s), pid {state.pid}, storage {state.storage}{extra}, "
                  f"log {state.log})", highlight=False)
    if state.admin_config:
        console.print(f"clients must log in: the admin's settings are in "
                      f"{state.admin_config}; give each service its own with "
                      f"'x2x access grant ROLE USER --out FILE'", highlight=False)


@app.command()
def run(port: int = _PORT, engine: str = _ENGINE, nodes: int = _NODES, auth: str = _AUTH,
        storage: str = _STORAGE, durable: bool = _DURABLE) -> None:
    """Run the broker in the foreground until SIGTERM or Ctrl-C (for systemd)."""
    broker.run(port, storage, durable=durable, engine=engine, nodes=nodes, auth=auth)


@app.command()
def down() -> None:
    """Stop the broker. Tansu in memory loses its journals; Apache Kafka keeps them."""
    console.print("broker stopped" if broker.down() else "no broker started by x2x was running")


@app.command()
def status(json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show whether the broker runs, and where."""
    state = broker.status()
    if json_:
        print_json(state.__dict__ if state else {"running": False})
    elif state:
        console.print(f"running at {state.bootstrap} ({state.engine}, {state.nodes} node(s), "
                      f"pid {state.pid}, storage {state.storage})")
    else:
        console.print("not running; start it with 'x2x broker up'")
        raise typer.Exit(3)


@node_app.command("stop")
def node_stop(node: int = typer.Argument(..., help="Node id (1..3)."),
              kill: bool = typer.Option(False, "--kill", help="SIGKILL: a crash, not a "
                                        "controlled shutdown.")) -> None:
    """Stop one node; the cluster goes on with the others."""
    broker.stop_node(node, kill=kill)
    console.print(f"node {node} {'killed' if kill else 'stopped'}")


@node_app.command("start")
def node_start(node: int = typer.Argument(..., help="Node id (1..3).")) -> None:
    """Start a stopped node again and wait until the cluster lists it."""
    broker.start_node(node)
    console.print(f"node {node} up")
