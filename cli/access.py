"""x2x access grant|revoke|show: Kafka principals for x2x's roles, with their ACLs."""
from __future__ import annotations

from pathlib import Path

import typer

from cli.common import console, print_json, settings
from infra import acl
from infra.files import atomic_write
from journal.roles import Role

app = typer.Typer(help="Kafka users for the roles operator, capturer and applier, each with "
                       "only the ACLs its job needs (run as the cluster's admin).",
                  no_args_is_help=True)

_ROLE = typer.Argument(..., help="operator, capturer or applier.")
_PAIR = typer.Option(None, "--pair", help="Only this pair's journal (default: every journal).")


def _role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        from journal.errors import BadInput
        raise BadInput(f"role {text!r} is unknown: choose one of "
                       f"{', '.join(r.value for r in Role)}") from None


@app.command()
def grant(ctx: typer.Context, role: str = _ROLE,
          user: str = typer.Argument(..., help="The SCRAM user name to create or reset."),
          pair: str = _PAIR,
          out: Path = typer.Option(..., "--out", help="Write the user's librdkafka "
                                   "properties here (mode 0600): its X2X_KAFKA_CONFIG.")) -> None:
    """Create USER with a new password and ROLE's ACLs; write its client settings."""
    s = settings(ctx)
    props = acl.grant(s.check_reachable(), user, _role(role), pair, s.bootstrap)
    atomic_write(out, acl.properties_text(props).encode())
    console.print(f"user {user} may act as {role}"
                  f"{f' of pair {pair}' if pair else ''}; its settings are in {out} "
                  f"(give it to that service as X2X_KAFKA_CONFIG)")


@app.command()
def revoke(ctx: typer.Context, user: str = typer.Argument(..., help="The user to remove.")) -> None:
    """Remove USER and every ACL it has."""
    n = acl.revoke(settings(ctx).check_reachable(), user)
    console.print(f"user {user} removed with {n} ACL(s)")


@app.command()
def show(role: str = _ROLE, pair: str = _PAIR,
         json_: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the ACLs ROLE gets (nothing is changed)."""
    grants = acl.grants(_role(role), pair)
    if json_:
        print_json([{"resource": g.resource.name, "name": g.name, "pattern": g.pattern.name,
                     "operation": g.operation.name} for g in grants])
        return
    for g in grants:
        console.print(g.describe(), highlight=False)
