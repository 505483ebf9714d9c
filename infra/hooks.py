"""Operator hooks: a shell command run on promotion or fencing, for what takes over the
server's identity (a virtual IP, starting the VM or the service, DNS).

The command gets what happened in its environment: ``X2X_EVENT`` (``promote`` or
``fence``), ``X2X_PAIR``, ``X2X_EPOCH``, ``X2X_VOLUME`` and, on promotion, ``X2X_SEQ``,
``X2X_RPO_S`` and ``X2X_RPO_OPS``; on fencing ``X2X_REASON``. Its exit status and output
are logged; a failing hook changes nothing x2x did (the promotion stands)."""
from __future__ import annotations

import logging
import os
import subprocess

log = logging.getLogger("x2x.hooks")
#: A hook that takes longer is killed (and logged): the service must go on.
TIMEOUT_S = 120.0


def run(command: str | None, event: str, **values: object) -> int | None:
    """Run ``command`` for ``event`` with ``values`` as X2X_* variables; its exit status,
    or None when there is no hook (or it could not run at all)."""
    if not command:
        return None
    env = {**os.environ, "X2X_EVENT": event,
           **{f"X2X_{k.upper()}": str(v) for k, v in values.items()}}
    try:
        done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("the %s hook %r did not complete: %s", event, command, e)
        return None
    level = logging.INFO if done.returncode == 0 else logging.ERROR
    log.log(level, "the %s hook %r exited %d%s", event, command, done.returncode,
            f": {(done.stdout + done.stderr).strip()[-500:]}" if done.stdout or done.stderr
            else "")
    return done.returncode
