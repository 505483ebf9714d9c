"""``infra.heartbeat.BeatTail``: the status topic followed by one consumer (``x2x status
--watch``, the benchmarks' RPO sampling) gives what reading it from the start gives,
keeps up as beats arrive, and skips what a one-shot read skips. Real broker."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict

import pytest
from confluent_kafka import Producer

from infra.heartbeat import BeatTail, beat_key, read_beats
from infra.kafka import KafkaSettings
from infra.net import free_port
from infra.reader import read_to_end
from infra.topics import STATUS_TOPIC, ensure_base_topics
from journal.clock import now_ms
from journal.errors import BrokerError
from journal.status import Beat, latest, newest
from schemas import codec
from tests.conftest import TEST_ENGINE
from tests.integration.test_control_auth import _keyed_pair


def _produce(settings, values: list[tuple[str, bytes]]) -> None:
    # As every x2x command does first: the broker creates no topic on its own.
    ensure_base_topics(settings.check_reachable())
    p = Producer(settings.side_producer())      # as heartbeats are published
    for key, value in values:
        p.produce(STATUS_TOPIC, value, key=key)
    assert p.flush(30) == 0


def _beat(pair: str, seq: int, host: str = "here") -> tuple[str, bytes]:
    b = Beat(pair, "capturer", "/dev/src", host, 1, now_ms(), "capturing", 1, seq, 0,
             now_ms())
    return beat_key(pair, "capturer", "/dev/src"), codec.encode(codec.HEARTBEAT, asdict(b))


def _until(tail: BeatTail, check, seconds: float = 10.0, **kw) -> dict:
    """``tail.latest(**kw)`` once ``check`` holds for it (beats arrive asynchronously)."""
    deadline = time.monotonic() + seconds
    while True:
        beats = tail.latest(**kw)
        if check(beats) or time.monotonic() > deadline:
            return beats
        time.sleep(0.05)


def test_a_tail_keeps_up_with_new_beats_as_a_fresh_read_sees_them(settings, pair_name):
    _produce(settings, [_beat(pair_name, 1)])
    with BeatTail(settings) as tail:
        first = tail.latest()
        assert newest(first.values(), pair_name, "capturer").seq == 1
        # Damaged and foreign records are skipped, as a one-shot read skips them.
        _produce(settings, [("junk", b"\x00not a beat"), _beat(pair_name, 2),
                            _beat(pair_name, 3)])
        beats = _until(tail, lambda b: newest(b.values(), pair_name, "capturer").seq == 3)
        assert newest(beats.values(), pair_name, "capturer").seq == 3
        fresh = latest(read_beats(settings))
        assert beats[(pair_name, "capturer", "/dev/src")] == \
            fresh[(pair_name, "capturer", "/dev/src")]
        # Nothing new of this pair: the same beat again (other tests' beats may come).
        assert newest(tail.latest().values(), pair_name, "capturer") == \
            beats[(pair_name, "capturer", "/dev/src")]


def test_a_tail_catches_up_on_a_topic_written_faster_than_its_fetch_waits(settings,
                                                                          pair_name):
    """Beats every 50 ms, more often than the tail's fetch waits at the end: a fetch
    at the topic's end is answered by the next beat, so the topic never reports its
    end; the first answer still comes, up to the end the broker gave when asked, and
    holds the beats written before it."""
    _produce(settings, [_beat(pair_name, 1)])
    stop = threading.Event()

    def beating() -> None:
        p = Producer(settings.side_producer())
        seq = 2
        while not stop.wait(0.05):
            key, value = _beat(pair_name, seq)
            p.produce(STATUS_TOPIC, value, key=key)
            p.flush(10)
            seq += 1

    writer = threading.Thread(target=beating, daemon=True)
    writer.start()
    answers: list[dict] = []
    try:
        time.sleep(1)
        tail = BeatTail(settings, timeout=10)
        reader = threading.Thread(target=lambda: answers.append(tail.latest()),
                                  daemon=True)
        reader.start()
        reader.join(30)
        # Not closed if stuck: closing a consumer another thread reads would hang too.
        assert answers, "the tail's first answer never came"
        tail.close()
        assert newest(answers[0].values(), pair_name, "capturer").seq >= 2
    finally:
        stop.set()
        writer.join(10)


def test_a_tail_skips_a_forged_beat_of_a_keyed_pair(settings, pair_name, tmp_path):
    st = _keyed_pair(settings, pair_name, tmp_path)
    specs = {pair_name: st.spec}
    with BeatTail(settings) as tail:
        genuine = newest(tail.latest(specs, strict=True).values(), pair_name, "capturer",
                         st.spec.source)
        assert genuine is not None and genuine.seq > 0
        forged = Beat(pair_name, "capturer", st.spec.source, "evil", 1, now_ms(),
                      "capturing", genuine.epoch, genuine.seq + 10**6, 0, now_ms())
        key = beat_key(pair_name, "capturer", st.spec.source)
        _produce(settings, [(key, codec.encode(codec.HEARTBEAT, asdict(forged))),
                            _beat("another-" + pair_name, 7)])
        # The unkeyed beat produced after the forged one shows the tail has read past it.
        beats = _until(tail, lambda b: newest(b.values(), "another-" + pair_name,
                                              "capturer") is not None, specs=specs,
                       strict=True)
        seen = newest(beats.values(), pair_name, "capturer", st.spec.source)
        assert seen == genuine and seen.host != "evil"


def test_a_tail_of_an_unreachable_broker_says_so(tmp_path):
    s = KafkaSettings.resolve(f"127.0.0.1:{free_port()}")
    with BeatTail(s, timeout=1.0) as tail:
        t0 = time.monotonic()
        try:
            tail.latest()
        except BrokerError as e:
            assert STATUS_TOPIC in str(e) and "is the broker up" in str(e)
        else:
            raise AssertionError("no error from a tail of a broker that is not there")
        assert time.monotonic() - t0 < 10


@pytest.mark.skipif(TEST_ENGINE != "kafka", reason="compaction is Apache Kafka's log "
                    f"cleaner; the session broker is {TEST_ENGINE}")
def test_the_status_topic_keeps_about_one_beat_per_service(settings, pair_name):
    """The topic is compacted (infra/topics.py), so a service that beats for months
    leaves one record, not millions: 300 beats of one service, a segment rolled behind
    them, and the broker's cleaner leaves the newest (its dedupe map is sized in
    infra/apache_kafka.py)."""
    key = beat_key(pair_name, "capturer", "/dev/src")
    _produce(settings, [_beat(pair_name, seq) for seq in range(1, 301)])

    def kept() -> list[int]:
        return [codec.decode(m.value(), codec.HEARTBEAT)["seq"]
                for m in read_to_end(settings, STATUS_TOPIC)
                if m.key() == key.encode()]
    # Uncompacted yet (a pass could take some of them only had a segment rolled amid
    # them and been cleaned at once).
    assert len(kept()) > 2
    # A segment rolls once its first record is 10 s old and another arrives; the
    # cleaner looks for work every 15 s.
    time.sleep(10.5)
    _produce(settings, [_beat(pair_name, 301)])
    deadline = time.monotonic() + 90
    while len(seqs := kept()) > 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(seqs) <= 2, f"{len(seqs)} beats of one service are still on the topic"
    assert seqs[-1] == 301
