"""Scenario 1: the pipeline's ceiling. A bare confluent-kafka produce + consume loop of the
same bytes, on the same broker with the journal's own producer settings, next to x2x's
capture -> journal -> apply of an incompressible image with the scan capturer.

Both sides run their two halves one after the other (produce then consume; capture then
apply), so end-to-end MB/s is bytes / (first half + second half) for each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import (BESIDE_DISK_PEER, CONSUME_WRITE_PEER, DISK_WRITE_PEER, MiB, Context,
                          apply_all, bare_consume, bare_produce, capture, consume_beside_disk,
                          disk_write, figure, make_pair, mbps, random_image, scratch_topic)

TITLE = "Pipeline ceiling: bare Kafka produce+consume vs x2x capture->journal->apply"


def bare_kafka(ctx: Context, path: str, size: int,
               write_peer: bool = True) -> dict[str, float]:
    """Produce the file in journal-sized records, then consume them all back; with
    ``write_peer``, once more writing them to a file (:data:`CONSUME_WRITE_PEER`), and
    once more beside the disk storing as many bytes (:data:`BESIDE_DISK_PEER`)."""
    with scratch_topic(ctx.settings, ctx.pair_name("bare")) as topic:
        count, produce_s = bare_produce(ctx.settings, topic, path)
        nbytes, consume_s = bare_consume(ctx.settings, topic)
        out = {"produce_s": produce_s, "consume_s": consume_s, "records": count,
               "bytes": nbytes, "produce_MBps": mbps(size, produce_s),
               "consume_MBps": mbps(size, consume_s),
               "end_to_end_MBps": mbps(size, produce_s + consume_s)}
        if write_peer:
            copy = Path(path).with_name("records.bin")
            _, consume_write_s = bare_consume(ctx.settings, topic, write_to=copy)
            copy.unlink()
            beside_s = consume_beside_disk(ctx.settings, topic, copy, size)
            out |= {"consume_write_s": consume_write_s,
                    "consume_write_MBps": mbps(size, consume_write_s),
                    "consume_beside_disk_s": beside_s,
                    "consume_beside_disk_MBps": mbps(size, beside_s)}
    return out


def run(ctx: Context) -> dict[str, Any]:
    size = ctx.size(512 * MiB, 16 * MiB)
    d = ctx.dir("pipeline")
    src = random_image(d / "src.img", size, seed=11)
    bare = bare_kafka(ctx, str(src), size)
    disk_s = disk_write(d / "disk.bin", size)

    spec = make_pair(ctx, "pipeline", src, d / "dst.img")
    scan = capture(ctx, spec)
    marks: dict[str, float] = {}
    stats, apply_s = apply_all(ctx, spec, marks=marks)
    x = {"capture_s": scan.seconds, "apply_s": apply_s, "bytes_sent": scan.bytes_sent,
         "apply_first_batch_s": marks.get("first_batch_s"),
         "capture_MBps": mbps(size, scan.seconds), "apply_MBps": mbps(size, apply_s),
         "end_to_end_MBps": mbps(size, scan.seconds + apply_s),
         "bytes_applied": stats.bytes_applied, "disk_write_s": disk_s,
         # Of apply_s: the applier writing the target, and reading waiting for that.
         "apply_write_s": stats.write_s, "apply_write_wait_s": stats.write_wait_s}
    # Later scenarios build on this run: the lag scenario writes at half of x2x's rate,
    # the replay scenario rebuilds a replica from this pair's journal.
    ctx.shared["max_MBps"] = x["end_to_end_MBps"]
    ctx.shared["pipeline_spec"] = spec
    return {
        "title": TITLE,
        "sizes": {"image_bytes": size},
        "figures": [
            figure("end-to-end throughput", "MB/s", x["end_to_end_MBps"],
                   "bare confluent-kafka produce+consume", bare["end_to_end_MBps"], "higher"),
            figure("capture / produce", "MB/s", x["capture_MBps"],
                   "bare confluent-kafka produce", bare["produce_MBps"], "higher"),
            figure("apply / consume", "MB/s", x["apply_MBps"],
                   "bare confluent-kafka consume", bare["consume_MBps"], "higher"),
            figure("apply / consume+write", "MB/s", x["apply_MBps"], CONSUME_WRITE_PEER,
                   bare["consume_write_MBps"], "higher"),
            figure("apply / the target disk alone", "MB/s", x["apply_MBps"], DISK_WRITE_PEER,
                   mbps(size, disk_s), "higher"),
            figure("apply / consume and the disk at once", "MB/s", x["apply_MBps"],
                   BESIDE_DISK_PEER, bare["consume_beside_disk_MBps"], "higher"),
        ],
        "details": {"x2x": x, "bare_kafka": bare},
    }
