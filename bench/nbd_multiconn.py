"""Benchmark: nbdcopy with multi-conn (4 connections, 4 threads) to and from the x2x NBD
export (async mode, journaling to the broker) against ``qemu-nbd -e 4`` on a raw file,
same machine, same run.

* to the export: a sparse image (half of its 64 KiB blocks random data, the rest holes)
  copied in with ``--flush``: data as WRITEs, holes as WRITE_ZEROES, then a FLUSH;
* from the export: that image copied out to ``null:``; with ``base:allocation`` block
  status nbdcopy reads only the data, so the x2x server's bytes read are reported too.

x2x runs twice: async (the FLUSH returns once the source is durable; the journal
follows) and flush-sync (the FLUSH returns once the broker holds everything, so that
copy's time includes the whole journal). Both servers keep the zeroed ranges as holes
and report them by block status, so both copies out read only the data.

Figures are MB/s of the image's logical size; ratio = x2x / qemu-nbd. nbdcopy hands each
thread 128 MiB at a time, so sizes of 512 MiB or more keep all 4 connections busy.

    .venv/bin/python -m bench.nbd_multiconn [--size-mib 512]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.nbd_capture import timed, wait_port
from infra.net import free_port

MiB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "nbd_multiconn.json"
TITLE = "nbdcopy with multi-conn (4 connections) to and from the x2x export vs qemu-nbd"
COPY = ["nbdcopy", "--connections=4", "--threads=4"]


def copy_both_ways(uri: str, data: Path, size: int) -> dict[str, float]:
    """nbdcopy into ``uri`` (with a flush), then out of it to null: ; MB/s of ``size``."""
    to_s = timed(*COPY, "--flush", str(data), uri)
    from_s = timed(*COPY, uri, "null:")
    return {"to_seconds": to_s, "to_MBps": size / to_s / 1e6,
            "from_seconds": from_s, "from_MBps": size / from_s / 1e6}


def bench_qemu_nbd(work: Path, data: Path, size: int) -> dict[str, float]:
    image = work / "qemu-nbd.img"
    with open(image, "wb") as f:
        f.truncate(size)
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "disk", "-b", "127.0.0.1",
                             "-p", str(port), "-e", "8", "-t", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        uri = f"nbd://127.0.0.1:{port}/disk"
        out = copy_both_ways(uri, data, size)
        info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                         text=True, check=True).stdout)
        out["multi_conn"] = bool(info["exports"][0].get("can_multi_conn"))
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        image.unlink()


def bench_x2x(work: Path, data: Path, size: int, settings: Any,
              mode: str = "async") -> dict[str, float]:
    from infra import control
    from journal.pairs import PairSpec
    from producers.journaling import Mode
    from producers.nbd_capture import NBDCapture

    source, target = work / "x2x-src.img", work / "x2x-dst.img"
    for p in (source, target):
        with open(p, "wb") as f:
            f.truncate(size)
    name = f"bench-multiconn-{mode}-{os.getpid()}"
    spec = PairSpec(name, str(source), str(target), 65536, size)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0, Mode.parse(mode)).start()
    records: list[Any] = []
    try:
        while cap.baseline and not cap.baseline.finished:   # a sparse source: quick
            time.sleep(0.05)
        cap.sync_point()
        cap.server.on_disconnect = records.append
        out = copy_both_ways(cap.uri, data, size)
        time.sleep(0.2)                     # the last connections' records
        out["connections"] = len(records)
        out["server_bytes_read"] = sum(r.bytes_read - r.bytes_holes for r in records)
        out["journal_bytes_sent"] = cap.pub.bytes_sent
    finally:
        report = cap.stop()
        control.delete_pair(settings, name)
        for p in (source, target):
            p.unlink()
    out["clean_stop"] = report.clean
    out["multi_conn"] = True
    return out


def measure(work: Path, size: int, settings: Any) -> dict[str, Any]:
    from bench.common import sparse_image
    data = sparse_image(work / "data.img", size, 0.5, seed=3)
    data_bytes = os.stat(data).st_blocks * 512
    try:
        return {"size_bytes": size, "data_bytes": data_bytes,
                "qemu-nbd": bench_qemu_nbd(work, data, size),
                "x2x async": bench_x2x(work, data, size, settings),
                "x2x flush-sync": bench_x2x(work, data, size, settings, "flush-sync")}
    finally:
        data.unlink(missing_ok=True)


def figures(res: dict[str, Any]) -> list[dict[str, Any]]:
    from bench.common import figure
    x, s, q = res["x2x async"], res["x2x flush-sync"], res["qemu-nbd"]
    return [
        figure("x2x async: nbdcopy 4 connections TO the export (--flush)", "MB/s",
               x["to_MBps"], "qemu-nbd -e 8 (tcp)", q["to_MBps"], "higher"),
        figure("x2x flush-sync: nbdcopy 4 connections TO the export (--flush: all on the "
               "broker)", "MB/s", s["to_MBps"], "qemu-nbd -e 8 (tcp)", q["to_MBps"], "higher"),
        figure("x2x async: nbdcopy 4 connections FROM the export (sparse, to null:)", "MB/s",
               x["from_MBps"], "qemu-nbd -e 8 (tcp)", q["from_MBps"], "higher")]


def run(ctx: Any) -> dict[str, Any]:
    """A scenario of ``make bench`` (the harness's broker)."""
    missing = [t for t in ("nbdcopy", "nbdinfo", "qemu-nbd") if not shutil.which(t)]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (libnbd-bin, qemu-utils)"}
    size = ctx.size(2048 * MiB, 256 * MiB)
    res = measure(ctx.dir("nbd_multiconn"), size, ctx.settings)
    return {"title": TITLE, "results": res, "figures": figures(res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from bench.common import standalone
    with standalone(("nbdcopy", "nbdinfo", "qemu-nbd")) as (home, settings):
        res = measure(home, args.size_mib * MiB, settings)
    figs = figures(res)
    for f in figs:
        print(f"{f['metric']:<72} {f['x2x']:>8.0f} vs {f['peer']:>8.0f} {f['unit']}"
              f"  ratio {f['ratio']:.2f}")
    x = res["x2x async"]
    print(f"x2x: {x['connections']} connections, {x['server_bytes_read']} bytes read of "
          f"{res['size_bytes']} ({res['data_bytes']} allocated in the image)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "cpus": os.cpu_count(), "machine": platform.platform(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": res, "figures": figs},
        indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
