"""Scenario: a database on two disks, the source host killed, a forced failover. PostgreSQL
keeps its data directory on one replicated disk and pg_wal on the other (ext4 over
nbdfuse over the NBD capture), pgbench runs, and the source is killed at the same moments
twice: once with the two pairs in a consistency group (one capture service, group cuts,
``x2x group failover --force``), once as two independent pairs (two capturers, a forced
failover of each). Counted, each against the rounds run: the rounds in which PostgreSQL
recovers on the targets with pgbench's sums agreeing; the errors of the others are
listed.

The crash round is the test's (tests/e2e/pg_two_disks.py)."""
from __future__ import annotations

import os
import random
from typing import Any

from bench.common import Context, figure, require, x2x_cmd
from bench.postgres import missing, workdir

TITLE = "Consistency groups: PostgreSQL (data and WAL on two disks) after forced failovers"


def run(ctx: Context) -> dict[str, Any]:
    why = (None if os.geteuid() == 0 else "needs root (loop devices and mounts)") \
        or require("nbdfuse", "mkfs.ext4", "losetup") or missing()
    if why:
        return {"title": TITLE, "skipped": why}
    from tests.e2e.pg_two_disks import cleanup, crash_round
    rounds = ctx.size(8, 1)
    rng = random.Random(16)
    moments = [rng.uniform(2.0, 12.0) for _ in range(rounds)]
    results: dict[str, list] = {"group": [], "independent": []}
    for i, after in enumerate(moments):
        for how in results:
            work = workdir()
            try:
                results[how].append(crash_round(x2x_cmd(), f"{ctx.pair_name('groups')}",
                                                work, after, grouped=how == "group"))
            finally:
                cleanup(work)
    ok = {how: sum(r.recovered for r in rs) for how, rs in results.items()}
    return {"title": TITLE,
            # Each against the rounds run: a ratio stays defined when one side never
            # recovers (two independent pairs may well fail every round).
            "figures": [figure(f"rounds in which PostgreSQL recovered, sums agreeing: {how}",
                               "rounds", ok[how], "rounds run", rounds, "higher")
                        for how in ("group", "independent")],
            "sizes": {"rounds": rounds, "pgbench_clients": 4, "pgbench_scale": 2},
            "details": {how: [{"crash_after_s": round(r.crash_after, 2),
                               "recovered": r.recovered, "error": r.error[:300],
                               "transactions": r.transactions} for r in rs]
                        for how, rs in results.items()}}
