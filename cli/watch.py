"""x2x watch: apply a pair's journal and fail over automatically when its source is lost."""
from __future__ import annotations

import typer

from cli.common import console, settings
from cli.replicate import _stop_on_signals
from consumers.watch import Watcher
from infra import control
from infra.keys import key_for, remember_file


def watch(ctx: typer.Context, name: str,
          on_promote: str = typer.Option(None, "--on-promote", metavar="CMD", help="A shell "
                                         "command run once this watcher promoted the target "
                                         "(X2X_PAIR, X2X_EPOCH, X2X_SEQ, X2X_VOLUME, "
                                         "X2X_RPO_S, X2X_RPO_OPS in its environment)."),
          key_file: str = typer.Option(None, help="The pair's key file, if it is encrypted."),
          timeout: float = typer.Option(300.0, help="Seconds the promotion's drain may take."),
          ) -> None:
    """On the target host: apply NAME's journal (as 'x2x apply' does) and, if the pair has
    automatic failover ('x2x pair auto-failover'), promote the target once the source is
    lost. Runs until SIGTERM/SIGINT or until the pair is promoted."""
    s = settings(ctx)
    remember_file(key_file)
    st = control.get_pair(s, name)
    auto = st.auto
    console.print(f"watching pair {name} on {st.active_spec.target}: " + (
        f"automatic failover after {auto.after_ms / 1000:g} s of silence (lease "
        f"{auto.lease_ms / 1000:g} s)" if auto else "automatic failover is off (applying "
        "only)") + "; stop with SIGTERM or Ctrl-C", highlight=False)
    r = Watcher(s, name, key_for(st.spec, key_file), on_promote, timeout=timeout).run(
        _stop_on_signals())
    if r is not None:
        bound = "unknown" if r.rpo_max_s is None else f"at most {r.rpo_max_s:.2f} s"
        console.print(f"promoted {r.promoted} (automatic) at epoch {r.epoch} seq {r.seq}; RPO "
                      f"{r.rpo_s:.2f} s, {r.rpo_ops} ops lost; RPO bound: {bound}",
                      highlight=False)
