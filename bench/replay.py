"""Scenario 6: building a new replica by replaying the journal, from the topic to a new
target, next to a bare consume of the same topic (records read, nothing decoded or
written): how close replay gets to what the broker can deliver; next to the same bare
consume writing what it reads to a file (a fairer peer: an applier writes too); next to
the target disk storing as many bytes alone; and next to the bare consume and the disk's
writes run at once, the floor of any replay to it on this machine (each alone is faster
than when they share the CPUs, as a replay makes them)."""
from __future__ import annotations

from typing import Any

from bench.common import (BESIDE_DISK_PEER, CONSUME_WRITE_PEER, DISK_WRITE_PEER, MiB, Context,
                          apply_all, bare_consume, capture, consume_beside_disk, delete_pair,
                          disk_write, empty_image, figure, make_pair, mbps, random_image,
                          same_volume)
from infra.topics import journal_topic

TITLE = "Replica build by replay: journal topic -> new target"


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.shared.get("pipeline_spec")
    d = ctx.dir("replay")
    if spec is None:                 # run alone (--only replay): make a journal first
        src = random_image(d / "src.img", ctx.size(512 * MiB, 16 * MiB), seed=12)
        spec = make_pair(ctx, "replay", src, d / "dst.img")
        capture(ctx, spec)
    size = spec.volume_size
    record_bytes, consume_s = bare_consume(ctx.settings, journal_topic(spec.name))
    copy = d / "records.bin"
    _, consume_write_s = bare_consume(ctx.settings, journal_topic(spec.name), write_to=copy)
    copy.unlink()
    disk_s = disk_write(d / "disk.bin", size)
    beside_s = consume_beside_disk(ctx.settings, journal_topic(spec.name), d / "disk.bin", size)
    replica = empty_image(d / "replica.img", size)
    marks: dict[str, float] = {}
    stats, apply_s = apply_all(ctx, spec, target=str(replica), store_dir=d, marks=marks)
    identical = same_volume(spec.source, replica)
    replica.unlink()
    delete_pair(ctx, spec)
    return {
        "title": TITLE,
        "sizes": {"volume_bytes": size, "journal_record_bytes": record_bytes},
        "figures": [figure("replay to a new target", "MB/s", mbps(size, apply_s),
                           "bare confluent-kafka consume of the same topic",
                           mbps(size, consume_s), "higher"),
                    figure("replay to a new target (peer writes)", "MB/s",
                           mbps(size, apply_s), CONSUME_WRITE_PEER,
                           mbps(size, consume_write_s), "higher"),
                    figure("replay to a new target vs its disk", "MB/s", mbps(size, apply_s),
                           DISK_WRITE_PEER, mbps(size, disk_s), "higher"),
                    figure("replay to a new target vs consume and the disk at once", "MB/s",
                           mbps(size, apply_s), BESIDE_DISK_PEER, mbps(size, beside_s),
                           "higher")],
        "details": {"apply_s": apply_s, "consume_s": consume_s,
                    "apply_first_batch_s": marks.get("first_batch_s"),
                    "consume_write_s": consume_write_s, "disk_write_s": disk_s,
                    "consume_beside_disk_s": beside_s,
                    "bytes_applied": stats.bytes_applied, "checkpoints": stats.checkpoints,
                    # Of apply_s: the applier writing the target, and reading waiting
                    # for that (the disk alone wrote as much in disk_write_s).
                    "apply_write_s": stats.write_s, "apply_write_wait_s": stats.write_wait_s,
                    "replica_identical_to_source": identical},
    }
