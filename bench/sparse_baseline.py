"""Scenario 5: the baseline of an image that is 30% data, 70% zeros (holes), next to
``rsync --sparse`` and ``cp --sparse=always`` to a fresh file.

x2x journals zero runs as ZERO ops, so its bytes sent are about the data; a local rsync
sends the whole file content, zeros included, and only writes holes on arrival. cp sends
nothing anywhere: its "bytes" are what it allocated on the destination.

Neither crosses a broker; x2x's data does, twice (capture produces it, the applier
consumes it). So beside them, the broker's own time for the same bytes: a bare
confluent-kafka produce then consume of as many random bytes as the image holds data,
with the journal's settings, one after the other as x2x's capture and apply run here.
"""
from __future__ import annotations

import time
from typing import Any

from bench.common import (GiB, MiB, Context, apply_all, capture, delete_pair, figure,
                          make_pair, random_image, require, rsync_stats, same_volume,
                          sparse_image, timed_run)
from bench.pipeline import bare_kafka

TITLE = "Baseline of a 30% data / 70% zeros image: x2x vs rsync --sparse vs cp --sparse=always"


def run(ctx: Context) -> dict[str, Any]:
    if reason := require("rsync", "cp"):
        return {"skipped": reason}
    size = ctx.size(1 * GiB, 32 * MiB)
    d = ctx.dir("sparse")
    src = sparse_image(d / "src.img", size, 0.30, seed=31)
    data_bytes = src.stat().st_blocks * 512

    spec = make_pair(ctx, "sparse", src, d / "x2x-dst.img")
    t0 = time.monotonic()
    scan = capture(ctx, spec)
    _, apply_s = apply_all(ctx, spec)
    x2x_s = time.monotonic() - t0
    x2x_ok = same_volume(src, spec.target)
    delete_pair(ctx, spec)

    rsync_dst, cp_dst = d / "rsync-dst.img", d / "cp-dst.img"
    rsync_s, out = timed_run("rsync", "--sparse", "--stats", str(src), str(rsync_dst))
    rs = rsync_stats(out)
    cp_s, _ = timed_run("cp", "--sparse=always", str(src), str(cp_dst))
    cp_alloc = cp_dst.stat().st_blocks * 512
    data = random_image(d / "data-only.img", data_bytes)
    bare = bare_kafka(ctx, str(data), data_bytes, write_peer=False)
    data.unlink()
    bare_s = bare["produce_s"] + bare["consume_s"]
    ok = {"x2x": x2x_ok, "rsync": same_volume(src, rsync_dst), "cp": same_volume(src, cp_dst)}
    for p in (rsync_dst, cp_dst):
        p.unlink()
    return {
        "title": TITLE,
        "sizes": {"image_bytes": size, "allocated_data_bytes": data_bytes},
        "figures": [
            figure("seconds", "s", x2x_s, "rsync --sparse", rsync_s, "lower"),
            figure("seconds", "s", x2x_s, "cp --sparse=always", cp_s, "lower"),
            figure("seconds", "s", x2x_s, "bare confluent-kafka produce+consume of the data "
                   "bytes", bare_s, "lower"),
            figure("bytes sent", "bytes", scan.bytes_sent, "rsync --sparse", rs["bytes_sent"],
                   "lower"),
            figure("bytes sent vs written", "bytes", scan.bytes_sent,
                   "cp --sparse=always (bytes allocated)", cp_alloc, "lower"),
        ],
        "details": {"x2x": {"seconds": x2x_s, "capture_s": scan.seconds, "apply_s": apply_s,
                            "bytes_sent": scan.bytes_sent},
                    "rsync": {"seconds": rsync_s, **rs}, "cp": {"seconds": cp_s,
                                                               "allocated": cp_alloc},
                    "bare_kafka": bare,
                    "identical": ok},
    }
