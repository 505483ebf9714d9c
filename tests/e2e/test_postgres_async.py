"""PostgreSQL on the NBD capture in async mode (a commit waits for the source only), the
source host crashed at moments spread over the run, then a forced failover.

The workload's own invariants decide: PostgreSQL recovers on the promoted target, and the
TPC-B sums of pgbench agree there. The target holds a prefix of what the source itself
recovers (never a transaction the source lost), and what it misses, measured by the
transactions' own timestamps, is within the RPO bound the failover reported.

Needs root, /dev/fuse, loop devices and PostgreSQL (skipped naming what is missing).
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

import pytest

from tests.conftest import free_port, run_x2x, x2x_bin
from bench.postgres import Postgres, missing, workdir
from tests.e2e.test_ext4_nbd import _requirements
from tests.e2e.test_failover import (abandon_export, capturer, mounted_export,
                                     mounted_image, new_pair, number)

pytestmark = pytest.mark.root
MiB = 1 << 20
#: Seconds of pgbench before each crash: spread from early (the first checkpoints) to late.
CRASH_AFTER = (1.5, 3.0, 4.5, 6.0, 8.0)
TIMES = ("select coalesce(extract(epoch from min(mtime)), 0) || '|' || "
         "coalesce(extract(epoch from max(mtime)), 0) from pgbench_history")


def _recovered(image: str, work, tag: str) -> tuple[int, float, float]:
    """Start PostgreSQL on ``image`` as its first user after a crash would: (transactions
    in history, the oldest one's time, the newest one's), with the TPC-B sums checked."""
    with mounted_image(image, work, readonly=False) as mnt:
        pg = Postgres(mnt / "pgdata", free_port())
        pg.start()
        try:
            count, _ = pg.tpcb()
            first, last = (float(t) for t in pg.psql(TIMES).split("|"))
        finally:
            pg.stop()
    print(f"  {tag}: {count} transactions, the newest at {last:.3f}")
    return count, first, last


def _crash_round(settings, name: str, crash_after: float) -> dict[str, float]:
    work = workdir()
    try:
        spec = new_pair(settings, name, work, 256 * MiB)
        applier_log = open(work / "apply.log", "w")
        applier = subprocess.Popen([x2x_bin(), "apply", name], stdout=applier_log,
                                   stderr=subprocess.STDOUT)
        try:
            with capturer(name, work / "cap.log", "async") as (proc, uri):
                with contextlib.ExitStack() as stack:
                    mnt = stack.enter_context(mounted_export(uri, work, mkfs=True))
                    pg = Postgres(mnt / "pgdata", free_port())
                    pg.init()
                    pg.start()
                    pg.init_bench(2)
                    bench = pg.pgbench("-n", "-c", "4", "-T", "120")
                    time.sleep(crash_after)
                    # The source host crashes: its capturer and its database at once.
                    proc.kill()
                    pg.kill()
                    bench.kill()
                    proc.wait(10)
                    stack.pop_all()
                    abandon_export(mnt, work)
        finally:
            applier.terminate()     # a forced failover drains the journal itself
            applier.wait(60)
            applier_log.close()
        out = run_x2x("pair", "failover", name, "--force").stdout
        rpo_s = number(r"RPO ([\d.]+) s", out)
        bound = number(r"RPO bound: at most ([\d.]+) s", out) if "RPO bound" in out else rpo_s
        target_n, _, target_last = _recovered(spec.target, work, "target")
        source_n, source_first, source_last = _recovered(spec.source, work, "source")
        # Early crashes may leave the target before the first transaction (the database
        # just initialized): a consistency point too, and what it misses is all of them.
        assert target_n <= source_n, (target_n, source_n)
        since = target_last if target_n else source_first
        missed_s = source_last - since if source_n > target_n else 0.0
        # Timestamps are taken at commit, the bound from capture times: 0.1 s of slack.
        assert missed_s <= bound + 0.1, (
            f"the target misses {missed_s:.2f} s of transactions but the failover "
            f"reported an RPO of at most {bound:.2f} s:\n{out}")
        return {"crash_after": crash_after, "source": source_n, "target": target_n,
                "missed_s": missed_s, "rpo_s": rpo_s, "bound": bound}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_postgres_recovers_on_the_target_after_source_crashes_in_async_mode(
        settings, pair_name):
    _requirements()
    if missing():
        pytest.skip(missing())
    rounds = [_crash_round(settings, f"{pair_name}-{i}", after)
              for i, after in enumerate(CRASH_AFTER)]
    assert any(r["target"] > 0 for r in rounds), "no transaction ever reached the target"
    print("\npgbench, async capture, source crashed, forced failover:")
    for r in rounds:
        print(f"  crash after {r['crash_after']:.1f} s: source {r['source']:.0f} txns, "
              f"target {r['target']:.0f} (missing {r['source'] - r['target']:.0f}, "
              f"{r['missed_s']:.2f} s); RPO reported {r['rpo_s']:.2f} s, at most "
              f"{r['bound']:.2f} s")
