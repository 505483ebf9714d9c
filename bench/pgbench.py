"""Scenario: a database on the capture. PostgreSQL's pgbench (TPC-B-like, 4 clients) on
ext4 over nbdfuse and a loop device, the export served over a unix socket (what a client
on the same machine would use) by qemu-nbd (the peer) and by ``x2x capture --nbd`` in
each mode with an applier following; RPO sampled from the heartbeats while pgbench runs, as ``x2x status`` shows it.

Every commit is a FLUSH: in async mode it waits for the source only, in flush-sync for
the journal too, in sync every write does (producers/journaling.py).

Runs of the same server differ by 10-15 % on these machines (qemu-nbd 2,233 to 2,539
tps in two full runs), as much as async's gap to qemu-nbd: the peer and async run
``PAIRED_RUNS`` times, one after the other in turns, and each figure is the median of
its runs (every run is in the details).

What bounds async on a small machine is CPU: the machine is about as busy with either
server, so tps follow the CPU a transaction costs. Each run records that cost, whole
machine and by process (the server, the applier, the broker, nbdfuse, the kernel's
threads, this harness's RPO sampler), from /proc (bench/cpu.py). The server itself is no
queue: under pgbench its reader thread waits for the next request ~80 % of the time
(py-spy), and it serves as many writes and FLUSHes per transaction as qemu-nbd (perf
counts of pwrite64 and fdatasync); its Python, the broker and the applier take CPU from
the processes every commit waits for (PostgreSQL, the kernel, nbdfuse). The applier
alone is ~5 % of async's tps: without it 1,816/1,937 tps, with it 1,701/1,858."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from bench.common import (Context, delete_pair, empty_image, figure, finish, make_pair,
                          percentile, require, sample_rpo, start, x2x_cmd)
from bench.cpu import by_role, machine_share, snapshot
from bench.postgres import Postgres, missing, workdir
from infra.net import free_port

TITLE = "A database on the capture: pgbench tps on ext4 over NBD, x2x modes vs qemu-nbd"
MiB = 1 << 20
MODES = ("async", "flush-sync", "sync")
#: Runs of qemu-nbd and of async, in turns (flush-sync and sync: one each): five, as
#: three left the median's ratio ±5 % from one bench run to the next.
PAIRED_RUNS = 5


def _wait(check, what: str, proc: subprocess.Popen | None = None,
          timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.05)


@contextlib.contextmanager
def _mounted(uri: str, work: Path) -> Iterator[Path]:
    """nbdfuse -> loop -> mkfs.ext4 -> mount, in a directory postgres can reach."""
    disk, mnt, pidfile = work / "disk", work / "mnt", work / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)         # the previous server's: not ready yet
    disk.touch()
    mnt.mkdir(exist_ok=True)
    fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(disk), uri],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    loop = ""
    try:
        _wait(pidfile.exists, "nbdfuse", fuse)
        loop = subprocess.run(["losetup", "--find", "--show", str(disk)], check=True,
                              capture_output=True, text=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                        "lazy_itable_init=0,lazy_journal_init=0", loop], check=True)
        subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True)
        os.chmod(mnt, 0o755)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        # Lazily: a loop device detaches asynchronously and may still hold the file.
        subprocess.run(["fusermount3", "-u", "-z", str(disk)], capture_output=True)
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(10)


def _pgbench(uri: str, work: Path, scale: int, seconds: int, roles: dict[int, str],
             during: threading.Event | None = None) -> tuple[float, dict[str, Any]]:
    """tps, and the CPU the run took: per transaction, by who took it (``roles`` names
    processes by pid: the server, the applier), and how busy the machine was."""
    with _mounted(uri, work) as mnt:
        pg = Postgres(mnt / "pgdata", free_port())
        pg.init()
        pg.start()
        try:
            pg.init_bench(scale)
            if during is not None:
                during.set()
            before = snapshot()
            tps = pg.tps(4, seconds)
            after = snapshot()
        finally:
            pg.stop()
    txs = max(tps * seconds, 1.0)
    spent = by_role(before, after, {os.getpid(): "harness", **roles})
    return tps, {"us_per_tx": {role: round(cpu * 1e6 / txs, 1) for role, cpu in spent.items()},
                 "busy": round(machine_share(before, after), 3)}


def _qemu_nbd(work: Path, size: int, scale: int,
              seconds: int) -> tuple[float, dict[str, Any]]:
    image, sock = empty_image(work / "qemu.img", size), work / "qemu.sock"
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "disk", "-k", str(sock), "-t",
                             str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(sock.exists, "qemu-nbd", proc)
        return _pgbench(f"nbd+unix:///disk?socket={sock}", work, scale, seconds,
                        {proc.pid: "server"})
    finally:
        proc.terminate()
        proc.wait(20)
        image.unlink()


def _x2x(ctx: Context, work: Path, mode: str, size: int, scale: int,
         seconds: int) -> tuple[float, list[float], dict[str, Any]]:
    src, dst = empty_image(work / "src.img", size), work / "dst.img"
    spec = make_pair(ctx, "pgbench", src, dst)
    sock = work / "x2x.sock"
    sock.unlink(missing_ok=True)        # a killed run's: ready means this capturer's
    # Their peak RSS polled once a second, not 20 times: two /proc reads every 50 ms cost
    # this process ~1% of a core, which qemu-nbd's runs (nothing polled) did not pay.
    cap = start([*x2x_cmd(), "capture", spec.name, "--nbd", str(sock), "--mode", mode],
                peak_every=1.0)
    app = start([*x2x_cmd(), "apply", spec.name], peak_every=1.0)
    running, stop, rpos = threading.Event(), threading.Event(), []
    sampler = sample_rpo(ctx.settings, spec.name, str(dst), stop, rpos, begin=running)
    try:
        _wait(sock.exists, "x2x capture", cap)
        tps, cpu = _pgbench(f"nbd+unix:///{spec.name}?socket={sock}", work, scale, seconds,
                            {cap.pid: "server", app.pid: "applier"}, running)
    finally:
        stop.set()
        running.set()
        sampler.join(10)
        for proc in (cap, app):
            proc.send_signal(signal.SIGTERM)
        finish(cap, ctx, f"capturer (nbd {mode}, pgbench)", "pgbench")
        finish(app, ctx, "applier (pgbench)", "pgbench")
        delete_pair(ctx, spec)
        for p in (src, dst):
            p.unlink(missing_ok=True)
    return tps, rpos, cpu


def _median_run(tps: list[float], cpu: list[dict[str, Any]]) -> dict[str, Any]:
    """The CPU of the run whose tps is the median (nearest rank)."""
    return cpu[tps.index(percentile(tps, 50))]


def _told(values: list[float]) -> str:
    """How a figure of these runs was taken: "median of N runs", or "" for one run."""
    return f"median of {len(values)} runs" if len(values) > 1 else ""


def run(ctx: Context) -> dict[str, Any]:
    why = (None if os.geteuid() == 0 else "needs root (loop devices and mounts)") \
        or require("nbdfuse", "qemu-nbd", "mkfs.ext4", "losetup") or missing()
    if why:
        return {"skipped": why}
    size, scale, seconds = ctx.size(1 << 30, 256 * MiB), ctx.size(10, 1), ctx.size(30, 5)
    work = workdir()
    try:
        runs: dict[str, list[float]] = {"qemu-nbd": []}
        cpu_runs: dict[str, list[dict[str, Any]]] = {"qemu-nbd": []}
        rpo_runs: dict[str, list[float]] = {}
        for n in range(ctx.size(PAIRED_RUNS, 1)):
            tps, cpu = _qemu_nbd(work, size, scale, seconds)
            runs["qemu-nbd"].append(tps)
            cpu_runs["qemu-nbd"].append(cpu)
            for mode in MODES if n == 0 else MODES[:1]:
                tps, rpos, cpu = _x2x(ctx, work, mode, size, scale, seconds)
                runs.setdefault(mode, []).append(tps)
                cpu_runs.setdefault(mode, []).append(cpu)
                rpo_runs.setdefault(mode, []).extend(rpos)
        # Nearest-rank median: the middle run, one that happened.
        peer = percentile(runs["qemu-nbd"], 50)
        figures, details = [], {"qemu_nbd_tps": peer, "runs_tps": runs,
                                "runs_cpu": cpu_runs}
        for mode in MODES:
            tps, rpos = percentile(runs[mode], 50), rpo_runs[mode]
            p50, p99 = percentile(rpos, 50), percentile(rpos, 99)
            # The RPO beside the speed it was bought with, as the heartbeats report it.
            mine, theirs = _told(runs[mode]), _told(runs["qemu-nbd"])
            figures.append(figure(
                f"pgbench tps, {mode} ({mine + '; ' if mine else ''}RPO p50/p99 "
                f"{p50:.2f}/{p99:.2f} s)", "tps", tps,
                "qemu-nbd" + (f", {theirs}" if theirs else ""), peer, "higher"))
            details[f"{mode}_tps"] = tps
            details[f"{mode}_rpo_p50_s"], details[f"{mode}_rpo_p99_s"] = p50, p99
        # What bounds async: the CPU a transaction costs, all processes together (the
        # machine is about as busy with either server), in each one's median run.
        mine, theirs = (_median_run(runs[k], cpu_runs[k]) for k in ("async", "qemu-nbd"))
        figures.append(figure(
            f"pgbench async: CPU per transaction, whole machine (busy "
            f"{mine['busy']:.0%}; qemu-nbd's {theirs['busy']:.0%})", "us",
            mine["us_per_tx"]["machine"], "qemu-nbd", theirs["us_per_tx"]["machine"],
            "lower"))
    finally:
        subprocess.run(["rm", "-rf", str(work)], capture_output=True)
    return {"title": TITLE, "figures": figures,
            "sizes": {"volume_bytes": size, "pgbench_scale": scale, "seconds": seconds,
                      "clients": 4},
            "details": details}
