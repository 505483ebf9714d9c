"""Scenario 9: a bounded journal. A volume is rewritten whole 20 times (quick: 10) while
a history base follows a short window: the bytes the broker holds (its log segments on
disk) next to the bytes written to the journal, which a journal without a window keeps
forever; and the cost of the base (CPU, bytes written to its volume) next to the pair's
own applier, which does the same work on the target.
"""
from __future__ import annotations

import random
import signal
import time
from pathlib import Path
from typing import Any

from bench.common import (MiB, Context, figure, finish, make_pair, pool, random_image,
                          same_volume, start, x2x_cmd)
from bench.cpu import cpu_seconds

TITLE = "Bounded journal: broker bytes held vs bytes written, cost of the history base"


def _write_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def run(ctx: Context) -> dict[str, Any]:
    from infra import control
    from infra.apache_kafka import partition_bytes
    from infra.broker import broker_dir
    from infra.retention import watermarks
    from infra.topics import journal_topic
    from journal.history import HistorySettings
    from producers.scan import scan_once

    size = ctx.size(64 * MiB, 8 * MiB)
    rounds = ctx.size(20, 10)
    window = ctx.size("10s", "2s")
    d = ctx.dir("history")
    src = random_image(d / "src.img", size, seed=91)
    spec = make_pair(ctx, "history", src, d / "dst.img")
    # A limit far above what the window holds (it must not engage here); it also sets
    # the segment size, a sixteenth of it.
    control.set_history(ctx.settings, spec.name, HistorySettings.parse(window, f"{size * 4}B"))
    base_img = d / "base.img"
    applier = start([*x2x_cmd(), "apply", spec.name])
    base = start([*x2x_cmd(), "base", spec.name, "--volume", str(base_img),
                  "--interval", "0.5"])
    rng, data = random.Random(7), pool()
    written, peak, t0 = 0, 0, time.monotonic()
    try:
        for i in range(rounds + 1):          # the baseline, then whole rewrites
            if i:
                with open(src, "r+b") as f:
                    for off in range(0, size, 4 * MiB):
                        f.write(data.take(rng, min(4 * MiB, size - off)))
            written += scan_once(spec, ctx.settings).bytes_sent
            peak = max(peak, partition_bytes(broker_dir(), journal_topic(spec.name)))
            time.sleep(0.5)
        write_s = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while not same_volume(src, spec.target) and time.monotonic() < deadline:
            time.sleep(0.5)
        window_s = HistorySettings.parse(window, None).window_ms / 1000
        time.sleep(window_s)                 # the window passes
        segment = HistorySettings(1, size * 4).segment_bytes
        deadline = time.monotonic() + 30     # Kafka's retention check frees the segments
        while True:
            end = partition_bytes(broker_dir(), journal_topic(spec.name))
            if end <= 2 * segment or time.monotonic() > deadline:
                break
            time.sleep(1)
        low, high = watermarks(ctx.settings, spec.name)
        cpu = {"base": cpu_seconds(base.pid), "applier": cpu_seconds(applier.pid)}
        wrote = {"base": _write_bytes(base.pid), "applier": _write_bytes(applier.pid)}
    finally:
        for proc in (applier, base):
            proc.send_signal(signal.SIGTERM)
        for proc, role in ((applier, "applier"), (base, "base")):
            finish(proc, ctx, role, "history")
    identical = {"target": same_volume(src, spec.target),
                 "base_at_head": same_volume(src, base_img)}
    return {
        "title": TITLE,
        "sizes": {"volume_bytes": size, "rewrites": rounds, "window": window,
                  "journal_bytes_written": written, "write_seconds": round(write_s, 1)},
        "figures": [
            figure("broker bytes held, peak", "bytes", peak,
                   "journal without a window (keeps all written)", written, "lower"),
            figure("broker bytes held, window passed", "bytes", end,
                   "journal without a window (keeps all written)", written, "lower"),
            figure("CPU seconds of the history base", "s", cpu["base"],
                   "the pair's applier", cpu["applier"], "lower"),
            figure("bytes written to disk by the base", "bytes", wrote["base"],
                   "the pair's applier", wrote["applier"], "lower"),
        ],
        "details": {"journal_offsets": [low, high], "cpu_seconds": cpu,
                    "disk_write_bytes": wrote, "identical": identical,
                    "base_volume": str(Path(base_img))},
    }
