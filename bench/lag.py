"""Scenario 3: lag under load. Random 64 KiB writes of incompressible data at 50% of the
sustained maximum for 60 s (quick: 5 s), with a live capturer and a following applier
running as the CLI runs them (``x2x capture``, ``x2x apply``).

The sustained maximum is that of the path measured, not only of the pipeline's
(scenario 1, in one process, no file system): the same writer, unthrottled for
``CALIBRATE_S`` seconds, and the time until the applier holds all of it; the load is half
of that or of the pipeline's end-to-end rate, whichever is lower. (Half the pipeline's
alone was at or past what the path through nbdfuse carries on these machines: a writer
asked for 169 MB/s wrote 104, and the RPO grew for the whole minute.)

Capturer: the NBD capturer (``x2x capture NAME --nbd``, written through ``nbdfuse``, an
fdatasync — NBD FLUSH, a consistency point — every 0.5 s) when it, nbdfuse and root are
available; otherwise the scan capturer (``--interval 1``, writes straight to the source
image). RPO and lag in ops are sampled every 0.5 s from heartbeats followed by one
consumer (``infra.heartbeat.BeatTail`` + ``journal.status``), as ``x2x status --watch``
computes them; a capturer beats every 0.5 s and an applier within 0.25 s of its
checkpoint moving, which bounds the resolution of the samples.

Peer: the interval between consistency points, the floor an asynchronous replica's RPO
cannot go below; the lag-in-ops peer is the ops journaled per such interval. Beside the
RPO p99, the slowest fsync of the target at a checkpoint the applier reported over the
run: every checkpoint waits for one, and on one machine the target shares its disk with
the brokers.

With the NBD capturer, a second run of the same load from a writer that never flushes:
the capturer's own cuts (``--cut-interval``, 1 s) are its only consistency points, and
its RPO p50/p99/max stand beside the cut interval. Lag and RPO count every write a
client was told is done and the target lacks, journaled or not.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (MiB, Context, capture, delete_pair, empty_image, figure, finish,
                          make_pair, percentile, pool, same_volume, start, x2x_cmd)
from infra.net import free_port
from infra.heartbeat import BeatTail
from journal.status import pair_status
from journal.clock import now_ms

TITLE = "Lag under load: RPO and lag in ops at 50% of the sustained maximum write rate"
WRITE_SIZE = 64 * 1024
SAMPLE_EVERY = 0.5
SCAN_INTERVAL = 1.0
NBD_FLUSH_EVERY = 0.5
#: Seconds the unthrottled writer runs to measure the path's sustained maximum.
CALIBRATE_S = 10
#: An unthrottled writer's "rate": far beyond any disk here.
UNTHROTTLED = 100e9


@dataclass
class Sample:
    t: float
    rpo_s: float
    lag_ops: int
    captured_seq: int
    #: The target's slowest fsync at a checkpoint over the applier's last minute.
    flush_s: float = 0.0


def _wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the NBD capturer exited before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the NBD capturer did not listen on {port} within {timeout:.0f} s")


def nbd_unavailable() -> str | None:
    """Why the NBD capturer cannot drive this scenario here, or None."""
    if os.environ.get("X2X_BENCH_LAG_CAPTURER") == "scan":
        return "scan capturer chosen with X2X_BENCH_LAG_CAPTURER=scan"
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        return "nbdfuse needs root and /dev/fuse"
    if not (shutil.which("nbdfuse") and shutil.which("fusermount3")):
        return "nbdfuse/fusermount3 not installed (apt-get install libnbd-bin fuse3)"
    try:
        import producers.nbd_capture  # noqa: F401
    except ImportError:
        return "the NBD capturer (producers/nbd_capture.py) is not available"
    return None


def _writer(path: str, size: int, rate: float, stop: threading.Event,
            flush_every: float | None, counters: dict[str, int]) -> None:
    """Write at ``rate`` bytes/s in 0.1 s slices; fdatasync every ``flush_every`` s."""
    rng = random.Random(33)
    fd = os.open(path, os.O_RDWR)
    blocks = size // WRITE_SIZE
    t0 = last_flush = time.monotonic()
    written = 0
    try:
        while not stop.is_set():
            due = rate * (time.monotonic() - t0)
            while written < due and not stop.is_set():
                os.pwrite(fd, pool().take(rng, WRITE_SIZE), rng.randrange(blocks) * WRITE_SIZE)
                written += WRITE_SIZE
                if flush_every and time.monotonic() - last_flush >= flush_every:
                    break       # an unthrottled writer flushes on time too
            now = time.monotonic()
            if flush_every and now - last_flush >= flush_every:
                os.fdatasync(fd)
                counters["flushes"] += 1
                last_flush = now
            time.sleep(0.02)
        if flush_every:
            os.fdatasync(fd)
    finally:
        os.close(fd)
        counters["bytes"] = written


def _sample(tail: BeatTail, name: str, target: str) -> Sample | None:
    st = pair_status(name, tail.latest(), now_ms())
    reps = [r for r in st.replicas if r.target == target]
    if not reps or reps[0].lag_ops is None:
        return None
    r = reps[0]
    return Sample(time.monotonic(), r.rpo_s or 0.0, r.lag_ops, st.captured_seq,
                  r.slowest_flush_s or 0.0)


def _wait_caught_up(tail: BeatTail, name: str, target: str, min_seq: int = 1,
                    timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = _sample(tail, name, target)
        if s and s.lag_ops == 0 and s.captured_seq >= min_seq:
            return
        time.sleep(0.25)
    raise RuntimeError(f"the applier of {name} did not catch up within {timeout:.0f} s")


def _phase(tail: BeatTail, name: str, target: str, write_path: str, size: int, rate: float,
           duration: float, flush_every: float | None
           ) -> tuple[list[Sample], dict[str, int], float]:
    """Write for ``duration`` seconds, sampling lag and RPO: (samples, counters, seconds)."""
    stop = threading.Event()
    counters = {"flushes": 0, "bytes": 0}
    writer = threading.Thread(target=_writer, args=(write_path, size, rate, stop,
                                                    flush_every, counters))
    samples: list[Sample] = []
    t0 = time.monotonic()
    writer.start()
    while time.monotonic() - t0 < duration:
        time.sleep(SAMPLE_EVERY)
        if s := _sample(tail, name, target):
            samples.append(s)
    stop.set()
    writer.join()
    return samples, counters, time.monotonic() - t0


def _sustained(tail: BeatTail, name: str, target: str, write_path: str, size: int,
               seconds: float, flush_every: float | None, wait: float) -> float:
    """Bytes/s the whole path keeps up with: what an unthrottled writer wrote in
    ``seconds``, over the time until the applier held all of it. Known to within
    ``wait`` (a capturer heartbeat after the last write, before which lag 0 may be
    stale), counted in: a rate a little low, never high."""
    first = _sample(tail, name, target)
    t0 = time.monotonic()
    _, counters, _ = _phase(tail, name, target, write_path, size, UNTHROTTLED, seconds,
                            flush_every)
    time.sleep(wait)
    _wait_caught_up(tail, name, target, (first.captured_seq if first else 0) + 1)
    return counters["bytes"] / (time.monotonic() - t0)


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(256 * MiB, 32 * MiB)
    duration = ctx.size(60, 5)
    pipeline_max = ctx.shared.get("max_MBps", 40.0) * 1e6
    d = ctx.dir("lag")
    src, dst = empty_image(d / "src.img", size), d / "dst.img"
    spec = make_pair(ctx, "lag", src, dst)
    why_not_nbd = nbd_unavailable()
    mnt = d / "nbd-disk"
    port = free_port()
    fuse: subprocess.Popen[bytes] | None = None
    cap_proc = app_proc = None
    # Heartbeats followed by one consumer, as ``x2x status --watch`` follows them.
    tail = BeatTail(ctx.settings)
    quiet: list[Sample] = []
    quiet_counters = {"bytes": 0}
    try:
        if why_not_nbd is None:
            cap_proc = start([*x2x_cmd(), "capture", spec.name, "--nbd",
                              f"127.0.0.1:{port}", "--mode", "async", "--json"])
            _wait_port(port, cap_proc)
            mnt.touch()
            pidfile = d / "nbdfuse.pid"
            fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt),
                                     f"nbd://127.0.0.1:{port}/{spec.name}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            deadline = time.monotonic() + 20
            while not pidfile.exists():
                if fuse.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nbdfuse did not come up: {fuse.stderr.read()!r}")
                time.sleep(0.05)
            write_path, flush_every, interval = str(mnt), NBD_FLUSH_EVERY, NBD_FLUSH_EVERY
        else:
            capture(ctx, spec)                       # the (all-zero) baseline, untimed
            cap_proc = start([*x2x_cmd(), "capture", spec.name, "--interval",
                              str(SCAN_INTERVAL), "--json"])
            write_path, flush_every, interval = str(src), None, SCAN_INTERVAL
        app_proc = start([*x2x_cmd(), "apply", spec.name])
        _wait_caught_up(tail, spec.name, str(dst))
        if fuse is not None:
            sustained = _sustained(tail, spec.name, str(dst), write_path, size,
                                   ctx.size(CALIBRATE_S, 2), flush_every, 1.0)
        else:       # the scan capturer's path is the pipeline's own: files, no FUSE
            sustained = pipeline_max
        rate = 0.5 * min(pipeline_max, sustained)
        first = _sample(tail, spec.name, str(dst))
        samples, counters, wrote_s = _phase(tail, spec.name, str(dst), write_path, size, rate,
                                            duration, flush_every)
        # Converge: one last consistency point, then the applier must reach it exactly.
        if fuse is None:
            cap_proc.send_signal(signal.SIGTERM)
            cap_res = finish(cap_proc, ctx, "capturer (scan --interval)", "lag")
            last = capture(ctx, spec)
            _wait_caught_up(tail, spec.name, str(dst), last.last_seq)
        else:
            # The writer's last fdatasync was journaled before it returned; give the
            # capturer one heartbeat to announce it, then the applier must reach it.
            time.sleep(2.5)
            _wait_caught_up(tail, spec.name, str(dst), (first.captured_seq if first else 0) + 1)
            # The same load from a writer that never flushes: the capturer's own cuts
            # (--cut-interval, 1 s) are the only consistency points; lag and RPO count
            # what clients were told is done, journaled or not (journal/DESIGN.md 8, 13).
            before = samples[-1].captured_seq if samples else 0
            quiet, quiet_counters, _ = _phase(tail, spec.name, str(dst), write_path, size,
                                              rate, duration, None)
            time.sleep(2.5)     # a beat after the last write: then lag 0 is the truth
            _wait_caught_up(tail, spec.name, str(dst), before + 1)
        converged = same_volume(src, dst)
    finally:
        tail.close()
        if fuse is not None:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
            fuse.wait(20)
        for proc in (cap_proc, app_proc):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
    if fuse is not None:
        cap_res = finish(cap_proc, ctx, "capturer (nbd async)", "lag")
    app_res = finish(app_proc, ctx, "applier (following)", "lag")
    delete_pair(ctx, spec)

    rpos = [s.rpo_s for s in samples]
    # Every checkpoint waits for the target's fsync: the slowest beside the interval between
    # consistency points says how much of the RPO the target's disk can explain (a disk
    # shared with the brokers here). Not beside the RPO p99 itself: a short run can sample
    # an RPO of 0 throughout, and a ratio to 0 says nothing.
    flush_max = max((s.flush_s for s in samples), default=0.0)
    lags = [float(s.lag_ops) for s in samples]
    ops = (samples[-1].captured_seq - (first.captured_seq if first else 0)) if samples else 0
    points = max(1.0, wrote_s / interval)
    ops_per_point = ops / points if ops else 1.0
    quiet_rpos = [s.rpo_s for s in quiet]
    if quiet:
        from producers.nbd_capture import CUT_INTERVAL
    capturer = "nbd (async, via nbdfuse)" if fuse is not None else "scan (--interval 1)"
    peer = (f"interval between consistency points ({interval:g} s"
            f"{' fdatasync' if fuse is not None else ' scan interval'})")
    return {
        "title": TITLE,
        "sizes": {"volume_bytes": size, "seconds": duration, "target_write_MBps": rate / 1e6},
        "figures": [
            figure("RPO p50", "s", percentile(rpos, 50), peer, interval, "lower"),
            figure("RPO p99", "s", percentile(rpos, 99), peer, interval, "lower"),
            figure("RPO max", "s", max(rpos, default=0.0), peer, interval, "lower"),
            figure("slowest target fsync at a checkpoint", "s", flush_max, peer, interval,
                   "lower"),
            figure("lag p50", "ops", percentile(lags, 50), "ops journaled per interval",
                   ops_per_point, "lower"),
            figure("lag p99", "ops", percentile(lags, 99), "ops journaled per interval",
                   ops_per_point, "lower"),
            figure("lag max", "ops", max(lags, default=0.0), "ops journaled per interval",
                   ops_per_point, "lower"),
        ] + ([
            figure("RPO p50, writer never flushes", "s", percentile(quiet_rpos, 50),
                   "--cut-interval", CUT_INTERVAL, "lower"),
            figure("RPO p99, writer never flushes", "s", percentile(quiet_rpos, 99),
                   "--cut-interval", CUT_INTERVAL, "lower"),
            figure("RPO max, writer never flushes", "s", max(quiet_rpos, default=0.0),
                   "--cut-interval", CUT_INTERVAL, "lower"),
        ] if quiet else []),
        "details": {"capturer": capturer, "why_not_nbd": why_not_nbd,
                    "sustained_MBps": sustained / 1e6, "pipeline_max_MBps": pipeline_max / 1e6,
                    "samples": len(samples), "written_bytes": counters["bytes"],
                    # In order, every 0.5 s: where a high percentile comes from.
                    "rpo_samples_s": [round(r, 3) for r in rpos],
                    "achieved_write_MBps": counters["bytes"] / wrote_s / 1e6,
                    "flushes": counters["flushes"], "ops_journaled": ops,
                    "never_flushing_samples": len(quiet),
                    "never_flushing_written_bytes": quiet_counters["bytes"],
                    "converged_identical": converged,
                    "capturer_max_rss": cap_res.max_rss_bytes,
                    "applier_max_rss": app_res.max_rss_bytes},
    }
