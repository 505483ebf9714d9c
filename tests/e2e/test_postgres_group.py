"""A consistency group keeps a database whole across its disks: PostgreSQL with its data
directory on one replicated disk and pg_wal on another (both through the group's NBD
capture service: nbdfuse, loop device, ext4), pgbench running, the source host killed at
random moments, a forced group failover. On the targets PostgreSQL starts, recovers, and
pgbench's invariant holds (the sums of abalance, tbalance, bbalance and of the history's
delta agree).

Needs root, /dev/fuse, loop devices and PostgreSQL (skipped naming what is missing).
``make bench`` (bench/groups.py) runs the same crashes with two independent pairs.
"""
from __future__ import annotations

import os
import random

import pytest

from bench.postgres import missing, workdir
from tests.conftest import x2x_bin
from tests.e2e.pg_two_disks import cleanup, crash_round
from tests.e2e.test_ext4_nbd import _requirements

pytestmark = pytest.mark.root
ROUNDS = 5
#: The crash moments are random; the seed is printed, and X2X_TEST_SEED replays a run.
SEED = int(os.environ.get("X2X_TEST_SEED", random.randrange(1 << 30)))


def test_postgres_on_two_disks_recovers_after_forced_group_failovers(settings, pair_name):
    _requirements()
    if missing():
        pytest.skip(missing())
    rng = random.Random(SEED)
    print(f"\nX2X_TEST_SEED={SEED}")
    rounds = []
    for i in range(ROUNDS):
        work = workdir()
        try:
            r = crash_round([x2x_bin()], f"{pair_name}-{i}", work, rng.uniform(1.0, 9.0),
                            grouped=True)
        finally:
            cleanup(work)
        print(f"  crash after {r.crash_after:.1f} s: "
              + (f"recovered, {r.transactions} transactions" if r.recovered
                 else f"NOT recovered: {r.error}"))
        assert "promoted (forced) at group cut" in r.failover, r.failover
        assert r.recovered, (f"crash after {r.crash_after:.1f} s (X2X_TEST_SEED={SEED}): "
                             f"{r.error}\n{r.failover}")
        rounds.append(r)
    assert any(r.transactions for r in rounds), "no transaction ever reached the targets"
