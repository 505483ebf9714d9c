"""Scenario: live capture of a disk in use (``x2x capture --trace``). PostgreSQL's
pgbench (TPC-B-like, 4 clients) on ext4 on a loop device, once alone and once while the
trace capturer follows the device (an applier following too), a consistency cut every
``CUT`` seconds: pgbench tps with and without it (alone, traced, traced, alone), and how
long each cut kept the filesystem frozen (p50, p99, max), as the capturer reports them.

``python -m bench.trace [--seconds N] [--scale N]`` runs it alone on a broker of its own
and writes bench/results/trace_capture.json."""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import figure, finish, percentile, require, sample_rpo, start, x2x_cmd
from bench.postgres import Postgres, missing, workdir
from infra.net import free_port

TITLE = "Live capture of a disk in use: pgbench tps with and without x2x capture --trace"
MiB = 1 << 20
CUT = 2.0
RESULTS = Path(__file__).parent / "results" / "trace_capture.json"


def _sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def _tps(work: Path, settings, size: int, scale: int, seconds: int,
         traced: bool) -> dict[str, Any]:
    """pgbench on a fresh ext4 over a loop device; with ``traced``, under the capturer."""
    from infra import control
    from journal.pairs import PairSpec
    backing, mnt, target = work / "disk.img", work / "mnt", work / "target.img"
    for p in (backing, target):
        with open(p, "wb") as f:
            f.truncate(size)
    mnt.mkdir(exist_ok=True)
    dev = _sh("losetup", "--find", "--show", str(backing)).strip()
    cap = app = None
    name = f"bench-trace-{os.getpid()}-{int(traced)}"
    out: dict[str, Any] = {}
    try:
        _sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        _sh("mount", "-t", "ext4", dev, str(mnt))
        os.chmod(mnt, 0o755)
        pg = Postgres(mnt / "pgdata", free_port())
        pg.init()
        pg.start()
        try:
            pg.init_bench(scale)
            if traced:
                control.create_pair(settings, PairSpec(name, dev, str(target), 64 * 1024,
                                                       size))
                app = start([*x2x_cmd(), "apply", name])
                cap = start([*x2x_cmd(), "capture", name, "--trace", "--cut-interval",
                             str(CUT)])
                time.sleep(3)       # the baseline of a small, mostly empty volume
            stop, rpos = threading.Event(), []
            sampler = (sample_rpo(settings, name, str(target), stop, rpos) if traced
                       else None)
            out["tps"] = pg.tps(4, seconds)
            stop.set()
            if sampler is not None:
                sampler.join(10)
                out["rpos"] = rpos
        finally:
            pg.stop()
        if cap is not None:
            cap.send_signal(signal.SIGTERM)
            text = finish(cap).stdout
            m = re.search(r"(\d+) cuts \((\d+) abandoned\), freeze p50 ([\d.]+) ms, p99 "
                          r"([\d.]+) ms, max ([\d.]+) ms", text)
            if m is None:
                raise RuntimeError(f"the trace capturer did not stop cleanly:\n{text}")
            out.update(cuts=int(m.group(1)), abandoned=int(m.group(2)),
                       freeze_p50_ms=float(m.group(3)), freeze_p99_ms=float(m.group(4)),
                       freeze_max_ms=float(m.group(5)))
    finally:
        for proc in (cap, app):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                finish(proc)
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        if traced:
            control.delete_pair(settings, name)
        for p in (backing, target):
            p.unlink(missing_ok=True)
    return out


def measure(work: Path, settings, size: int, scale: int, seconds: int) -> dict[str, Any]:
    """Alone, traced, traced, alone (ABBA: a machine whose load drifts during the run
    weighs on both alike); tps are the means, freeze figures the worst of the two."""
    runs = [_tps(work, settings, size, scale, seconds, traced=t)
            for t in (False, True, True, False)]
    alone, traced = [runs[0], runs[3]], [runs[1], runs[2]]
    rpos = [v for r in traced for v in r.get("rpos", [])]
    worst = {k: max(r[k] for r in traced) for k in ("freeze_p50_ms", "freeze_p99_ms",
                                                    "freeze_max_ms")}
    return {"alone": {"tps": sum(r["tps"] for r in alone) / 2,
                      "runs_tps": [r["tps"] for r in alone]},
            "traced": {"tps": sum(r["tps"] for r in traced) / 2,
                       "runs_tps": [r["tps"] for r in traced],
                       "cuts": sum(r["cuts"] for r in traced),
                       "abandoned": sum(r["abandoned"] for r in traced), **worst,
                       "rpo_p50_s": percentile(rpos, 50) if rpos else None,
                       "rpo_p99_s": percentile(rpos, 99) if rpos else None},
            "cut_interval_s": CUT, "volume_bytes": size, "pgbench_scale": scale,
            "seconds": seconds, "clients": 4}


def figures(res: dict[str, Any]) -> list[dict[str, Any]]:
    t = res["traced"]
    return [figure(f"pgbench tps under capture --trace (cut every {res['cut_interval_s']:g}"
                   f" s; freeze p50/p99/max {t['freeze_p50_ms']:.0f}/{t['freeze_p99_ms']:.0f}"
                   f"/{t['freeze_max_ms']:.0f} ms; RPO p50/p99 {_s(t['rpo_p50_s'])}/"
                   f"{_s(t['rpo_p99_s'])} s)", "tps", t["tps"], "no capture",
                   res["alone"]["tps"], "higher")]


def _s(v: float | None) -> str:
    return "?" if v is None else f"{v:.1f}"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (tracefs, loop devices, mounts, FIFREEZE)"
    return require("mkfs.ext4", "losetup") or missing()


def run(ctx) -> dict[str, Any]:
    why = _why_not()
    if why:
        return {"skipped": why}
    work = workdir()
    try:
        res = measure(work, ctx.settings, ctx.size(1 << 30, 256 * MiB), ctx.size(10, 2),
                      ctx.size(30, 10))
    finally:
        subprocess.run(["rm", "-rf", str(work)], capture_output=True)
    return {"title": TITLE, "results": res, "figures": figures(res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    why = _why_not()
    if why:
        raise SystemExit(why)
    from bench.common import standalone
    with standalone(("mkfs.ext4", "losetup")) as (_home, settings):
        work = workdir()
        try:
            res = measure(work, settings, args.size_mib * MiB, args.scale, args.seconds)
        finally:
            subprocess.run(["rm", "-rf", str(work)], capture_output=True)
    for f in figures(res):
        print(f"{f['metric']}: {f['x2x']:.0f} vs {f['peer']:.0f} {f['unit']}, "
              f"ratio {f['ratio']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpus": os.cpu_count(), "machine": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": res,
        "figures": figures(res)}, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
