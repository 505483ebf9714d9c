"""PostgreSQL on two replicated disks (its data directory on one, ``pg_wal`` on the other),
each through the NBD capture (nbdfuse, loop device, ext4), pgbench running, the source
host killed, a forced failover; then PostgreSQL is started on the two targets and
pgbench's invariant is checked. Shared by the consistency group test (the two pairs in a
group) and ``bench/groups.py`` (the same run with two independent pairs beside it).

Everything goes through the x2x CLI as an operator would run it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.postgres import Postgres
from infra.net import free_port
from tests.e2e.test_ext4_nbd import mounted_export
from tests.e2e.test_failover import abandon_export, mounted_image, service

MiB = 1 << 20
SIZE = 256 * MiB
DISKS = ("data", "wal")


@dataclass
class Round:
    """What one crash did on the promoted targets."""

    crash_after: float
    recovered: bool            # PostgreSQL started on the targets and the sums agree
    error: str                 # why not (PostgreSQL's or the invariant's words)
    transactions: int          # in pgbench_history on the targets
    failover: str              # what the failover printed


def _x2x(x2x: list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*x2x, *args], capture_output=True, text=True, timeout=600)
    if check and r.returncode:
        raise RuntimeError(f"x2x {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r


def crash_round(x2x: list[str], name: str, work: Path, crash_after: float,
                grouped: bool) -> Round:
    """One run: two pairs (``NAME-data``, ``NAME-wal``), in group ``NAME`` or independent."""
    pairs = {d: f"{name}-{d}" for d in DISKS}
    for d, p in pairs.items():
        (work / d).mkdir(parents=True)
        for side in ("src", "dst"):
            with open(work / d / f"{side}.img", "wb") as f:
                f.truncate(SIZE)
        _x2x(x2x, "pair", "create", p, "--source", str(work / d / "src.img"), "--target",
             str(work / d / "dst.img"))
    port = free_port()
    uris = {d: f"nbd://127.0.0.1:{port}/{p}" for d, p in pairs.items()}
    if grouped:
        _x2x(x2x, "group", "create", name, *[a for p in pairs.values() for a in ("--pair", p)])
        captures = [(["group", "capture", name, "--nbd", f"127.0.0.1:{port}"],
                     work / "capture.log")]
    else:
        ports = {d: free_port() for d in DISKS}
        uris = {d: f"nbd://127.0.0.1:{ports[d]}/{p}" for d, p in pairs.items()}
        captures = [(["capture", p, "--nbd", f"127.0.0.1:{ports[d]}"],
                     work / f"capture-{d}.log") for d, p in pairs.items()]
    with contextlib.ExitStack() as services:
        # Appliers last in, first out: a forced failover drains the journals itself.
        caps = [services.enter_context(service(args, log, "serving")) for args, log in captures]
        appliers = [services.enter_context(service(["apply", p], work / f"apply-{d}.log", ""))
                    for d, p in pairs.items()]
        with contextlib.ExitStack() as stack:
            mnt = {d: stack.enter_context(mounted_export(uris[d], work / d, mkfs=True))
                   for d in DISKS}
            pg = Postgres(mnt["data"] / "pgdata", free_port())
            pg.init(waldir=mnt["wal"] / "pg_wal")
            pg.start()
            pg.init_bench(2)
            bench = pg.pgbench("-n", "-c", "4", "-T", "300")
            # Checkpoints every half second: the data disk is written (and pg_control
            # moved) often, not only the log, so the two disks' order matters.
            done = threading.Event()
            threading.Thread(target=_checkpoints, args=(pg, done), daemon=True).start()
            time.sleep(crash_after)
            done.set()
            gone = [a.args for a in appliers if a.poll() is not None]
            if gone:
                raise RuntimeError(f"an applier exited before the crash: {gone}; see "
                                   f"{work}/apply-*.log")
            # The source host crashes: its capture service and its database at once.
            for c in caps:
                c.kill()
            pg.kill()
            bench.kill()
            for c in caps:
                c.wait(10)
            stack.pop_all()
            for d in DISKS:
                abandon_export(mnt[d], work / d)
    if grouped:
        said = _x2x(x2x, "group", "failover", name, "--force").stdout
    else:
        said = "".join(_x2x(x2x, "pair", "failover", p, "--force").stdout
                       for p in pairs.values())
    ok, error, count = _recover(work, {d: work / d / "dst.img" for d in DISKS})
    return Round(crash_after, ok, error, count, said)


def _checkpoints(pg: Postgres, done: threading.Event) -> None:
    while not done.wait(0.5):
        try:
            pg.psql("CHECKPOINT")
        except Exception:       # noqa: BLE001 - the server is killed under it
            return


def _recover(work: Path, images: dict[str, Path]) -> tuple[bool, str, int]:
    """Start PostgreSQL on the targets as its first user after a crash would (pg_wal
    pointed at the WAL target's mount); (recovered, why not, transactions)."""
    for d in DISKS:
        (work / f"t{d}").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        mnt = {d: stack.enter_context(mounted_image(str(images[d]), work / f"t{d}",
                                                    readonly=False))
               for d in DISKS}
        data = mnt["data"] / "pgdata"
        link = data / "pg_wal"
        if not link.is_symlink() and not link.exists():
            return False, "the data target has no pg_wal (initdb never reached it)", 0
        link.unlink()
        os.symlink(mnt["wal"] / "pg_wal", link)
        pg = Postgres(data, free_port())
        try:
            pg.start()
        except AssertionError as e:
            log = _server_log(pg)
            return False, f"PostgreSQL did not start: {log or e}", 0
        try:
            count, _ = pg.tpcb()
            return True, "", count
        except AssertionError as e:
            return False, str(e).splitlines()[0], 0
        finally:
            pg.stop()


def _server_log(pg: Postgres) -> str:
    """The FATAL/PANIC lines of the server's log."""
    try:
        text = (pg.sock / "server.log").read_text()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if "FATAL" in ln or "PANIC" in ln]
    return " / ".join(lines[-3:])


def cleanup(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
