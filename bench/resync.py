"""Scenario 4: resync after 1% of the 4 KiB blocks of an incompressible image changed at
random. x2x's incremental (block-hash) scan + apply, at its default 64 KiB blocks and at
4 KiB blocks (the same granularity as the change, for fairness), next to
``rsync --inplace --no-whole-file`` of the same change (a local rsync would otherwise copy
whole files; ``-I`` so its size+mtime quick check cannot skip the file).

Bytes sent: x2x's journal record bytes (ScanResult.bytes_sent, before Kafka's own
compression, which gains nothing on random data); rsync's ``Total bytes sent``.
"""
from __future__ import annotations

import shutil
import time
from typing import Any

from bench.common import (GiB, MiB, Context, apply_all, capture, delete_pair, figure,
                          make_pair, mutate_blocks, random_image, require, rsync_stats,
                          same_volume, timed_run)

TITLE = "Resync after 1% of 4 KiB blocks changed: x2x block-hash incremental vs rsync delta"


def run(ctx: Context) -> dict[str, Any]:
    if reason := require("rsync"):
        return {"skipped": reason}
    size = ctx.size(1 * GiB, 32 * MiB)
    d = ctx.dir("resync")
    src = random_image(d / "src.img", size, seed=21)
    rsync_dst = d / "rsync-dst.img"
    shutil.copyfile(src, rsync_dst)
    # Two pairs on the one source, each brought in sync first (untimed).
    specs = {bs: make_pair(ctx, "resync", src, d / f"dst-{bs // 1024}k.img", block_size=bs)
             for bs in (64 * 1024, 4096)}
    for spec in specs.values():
        capture(ctx, spec)
        apply_all(ctx, spec)

    changed = mutate_blocks(src, 0.01, seed=22)

    rsync_s, out = timed_run("rsync", "-I", "--inplace", "--no-whole-file", "--stats",
                             str(src), str(rsync_dst))
    rs = rsync_stats(out)
    results: dict[int, dict[str, Any]] = {}
    for bs, spec in specs.items():
        t0 = time.monotonic()
        scan = capture(ctx, spec)
        stats, _ = apply_all(ctx, spec)
        seconds = time.monotonic() - t0
        results[bs] = {"seconds": seconds, "capture_s": scan.seconds,
                       "bytes_sent": scan.bytes_sent, "bytes_changed_blocks": scan.bytes_changed,
                       "blocks_changed": scan.blocks_changed,
                       "identical": same_volume(src, spec.target)}
        delete_pair(ctx, spec)
    rsync_identical = same_volume(src, rsync_dst)

    figures = []
    for bs, r in results.items():
        label = f"x2x {bs // 1024} KiB blocks"
        figures += [
            figure(f"{label}: seconds", "s", r["seconds"], "rsync --inplace --no-whole-file",
                   rsync_s, "lower"),
            figure(f"{label}: bytes sent", "bytes", r["bytes_sent"], "rsync",
                   rs["bytes_sent"], "lower"),
            figure(f"{label}: bytes sent / bytes changed", "x", r["bytes_sent"] / changed,
                   "rsync", rs["bytes_sent"] / changed, "lower"),
        ]
    return {
        "title": TITLE,
        "sizes": {"image_bytes": size, "bytes_changed": changed, "blocks_changed_4k":
                  changed // 4096},
        "figures": figures,
        "details": {"x2x": {f"{bs // 1024}KiB": r for bs, r in results.items()},
                    "rsync": {"seconds": rsync_s, **rs, "identical": rsync_identical}},
    }
