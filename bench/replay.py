"""Scenario 6: building a new replica by replaying the journal, from the topic to a new
target, next to a bare consume of the same topic (records read, nothing decoded or
written): how close replay gets to what the broker can deliver."""
from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from bench.common import (MiB, Context, apply_all, capture, delete_pair, empty_image, figure,
                          make_pair, mbps, random_image, same_volume)
from infra.topics import journal_topic

TITLE = "Replica build by replay: journal topic -> new target"


def bare_consume(ctx: Context, topic: str) -> tuple[int, float]:
    consumer = Consumer(ctx.settings.consumer())
    consumer.assign([TopicPartition(topic, 0, 0)])
    t0 = time.monotonic()
    nbytes = 0
    deadline = time.monotonic() + 300
    try:
        while True:
            # Short waits, as the applier's own loop uses: consume() waits the whole
            # timeout whenever fewer records than asked for are left.
            batch = consumer.consume(500, 0.1)
            if not batch and time.monotonic() > deadline:
                raise RuntimeError(f"no answer while reading {topic}")
            for msg in batch:
                err = msg.error()
                if err is None:
                    nbytes += len(msg.value())
                elif err.code() == KafkaError._PARTITION_EOF:
                    return nbytes, time.monotonic() - t0
                else:
                    raise RuntimeError(f"reading {topic}: {err.str()}")
    finally:
        consumer.close()


def run(ctx: Context) -> dict[str, Any]:
    spec = ctx.shared.get("pipeline_spec")
    d = ctx.dir("replay")
    if spec is None:                 # run alone (--only replay): make a journal first
        src = random_image(d / "src.img", ctx.size(512 * MiB, 16 * MiB), seed=12)
        spec = make_pair(ctx, "replay", src, d / "dst.img")
        capture(ctx, spec)
    size = spec.volume_size
    record_bytes, consume_s = bare_consume(ctx, journal_topic(spec.name))
    replica = empty_image(d / "replica.img", size)
    stats, apply_s = apply_all(ctx, spec, target=str(replica), store_dir=d)
    identical = same_volume(spec.source, replica)
    replica.unlink()
    delete_pair(ctx, spec)
    return {
        "title": TITLE,
        "sizes": {"volume_bytes": size, "journal_record_bytes": record_bytes},
        "figures": [figure("replay to a new target", "MB/s", mbps(size, apply_s),
                           "bare confluent-kafka consume of the same topic",
                           mbps(size, consume_s), "higher")],
        "details": {"apply_s": apply_s, "consume_s": consume_s,
                    "bytes_applied": stats.bytes_applied, "checkpoints": stats.checkpoints,
                    "replica_identical_to_source": identical},
    }
