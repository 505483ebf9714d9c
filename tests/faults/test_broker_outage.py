"""The broker goes away under a running NBD capturer (a broker of the test's own).

* async, broker frozen (SIGSTOP: unreachable, its data kept): client writes keep
  succeeding, the capturer goes degraded and marks; once the broker answers again a new
  epoch resends exactly the marked extents and the target converges without a reset.
* sync, broker stopped and restarted (memory storage: every topic is gone): writes fail
  with EIO instead of being acknowledged unjournaled; the capturer recreates its journal,
  resends only its marked extents in a new epoch and marks the pair needs-resync; the
  applier reports JournalLost with the recovery command, a replay from scratch is
  refused, and ``x2x pair resync NAME`` (answered by the still running capturer) repairs
  the target by block hashes, sending far less than the volume.
* a service following the pairs (the failover watcher's ``PairsTail``) sees the broker
  come back empty: it reads the pairs afresh, and the old broker's are gone from its view.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from infra import control
from infra.heartbeat import read_beats
from tests.conftest import noise_file, run_x2x
from tests.faults.conftest import TALLY, MiB, OwnBroker, Proc, converged, need
from tests.faults.test_process_kills import start_capturer
from tests.integration.test_nbd_capture import baseline_journaled, make_pair, wait_beat

STALL = {"X2X_JOURNAL_STALL": "2"}  # noqa


def newest_capture_beat(settings, name: str, cond, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            beats = [b for b in read_beats(settings) if b.pair == name and b.role == "capturer"]
        except Exception:        # noqa: BLE001 - the broker may still be coming back
            beats = []
        newest = max(beats, key=lambda b: b.at_ms) if beats else None
        if newest is not None and cond(newest):
            return newest
        assert time.monotonic() < deadline, f"no capturer heartbeat of {name} as expected"
        time.sleep(0.3)


def qemu_io(*cmds: str, uri: str) -> subprocess.CompletedProcess[str]:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    return subprocess.run(args + [uri], text=True, capture_output=True, timeout=120)


def test_async_outage_degrades_then_resends_exactly_the_marked_extents(own_broker: OwnBroker,
                                                                      tmp_path):
    need("qemu-io")
    s, name, size = own_broker.settings(), "outage-async", 32 * MiB
    spec = make_pair(s, name, tmp_path, size, seed=21, data_fraction=0.4)
    cap = start_capturer(name, env={**own_broker.env, **STALL}, verbose=True)
    try:
        newest_capture_beat(s, name, baseline_journaled)
        own_broker.x2x("apply", name, "--until-caught-up")
        own_broker.freeze()
        t0 = time.monotonic()
        # Writes and a FLUSH keep succeeding while nothing can be journaled.
        p = qemu_io("write -P 0x41 1M 3M", "flush", "write -P 0x42 20M 64k", "flush",
                    "write -z 28M 1M", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        cap.wait_log("degraded", timeout=30)
        p = qemu_io("write -P 0x43 2M 128k", uri=cap.uri)   # degraded: marked only
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        own_broker.thaw()
        TALLY["broker outages"] += 1
        line = cap.wait_log("broker back", timeout=60)
        assert "resends the marked extents" in line, line
        beat = newest_capture_beat(s, name, lambda b: b.epoch == 2
                                   and b.detail.get("resend") == "done")
        assert beat.state == "capturing"
        print(f"async outage: degraded and back in {time.monotonic() - t0:.1f} s")
        assert "stopped (clean)" in cap.stop()
    finally:
        own_broker.thaw()
        cap.kill()
    resent = re.search(r"resent (\d+) bytes", cap.stderr())
    # Exactly the marked extents: the 64 KiB blocks the writes touched (3M + 64k + 1M +
    # 128k, block-aligned), far below the 32 MiB volume.
    assert resent is not None, "the capturer did not log what it resent:\n" + cap.stderr()
    assert 0 < int(resent.group(1)) <= 5 * MiB, resent.group(0)
    own_broker.x2x("apply", name, "--until-caught-up")     # same journal: no reset needed
    assert converged(spec.source, spec.target)


def test_async_full_backlog_degrades_instead_of_making_clients_wait(own_broker: OwnBroker,
                                                                   tmp_path):
    """async: the backlog is bounded; a client that fills it is not held at the broker's
    pace, the capturer degrades instead and resends the marked extents in the same epoch
    once the backlog drained."""
    need("qemu-io")
    s, name, size = own_broker.settings(), "backlog-full", 64 * MiB
    spec = make_pair(s, name, tmp_path, size, seed=22, data_fraction=0.2)
    # A long stall limit: only a full backlog can degrade it here, not the stall check.
    env = {**own_broker.env, "X2X_JOURNAL_STALL": "300", "X2X_SPOOL_MAX": "2MiB"}
    cap = start_capturer(name, env=env, verbose=True)
    try:
        newest_capture_beat(s, name, baseline_journaled)
        own_broker.x2x("apply", name, "--until-caught-up")
        own_broker.freeze()
        # 40 MiB while the broker takes nothing: past the 2 MiB spool and the 16 MiB in
        # memory. Held at the broker's pace, qemu-io would time out (120 s).
        # Data: a pattern (one byte repeated) is a FILL op, which takes no backlog.
        noise = noise_file(tmp_path / "noise", 20 * MiB)
        p = qemu_io(f"write -s {noise} 0 20M", f"write -s {noise} 20M 20M", "flush",
                    f"write -s {noise} 48M 1M", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        line = cap.wait_log("degraded", timeout=10)
        assert "backlog is full" in line, line
        own_broker.thaw()
        TALLY["broker outages"] += 1
        cap.wait_log("the backlog drained", timeout=120)
        beat = newest_capture_beat(s, name, lambda b: b.detail.get("resend") == "done"
                                   and b.state == "capturing")
        assert beat.epoch == 1, "a full backlog needs no new epoch"
        assert "stopped (clean)" in cap.stop()
    finally:
        own_broker.thaw()
        cap.kill()
    own_broker.x2x("apply", name, "--until-caught-up")
    assert converged(spec.source, spec.target)


def test_sync_outage_fails_writes_with_eio_and_recovers_after_a_broker_restart(
        own_tansu: OwnBroker, tmp_path):
    need("qemu-io")
    s, name, size = own_tansu.settings(), "outage-sync", 16 * MiB
    spec = make_pair(s, name, tmp_path, size, seed=22, data_fraction=0.4)
    cap = start_capturer(name, "--mode", "sync", env={**own_tansu.env, **STALL},
                         verbose=True)
    try:
        newest_capture_beat(s, name, lambda b: b.detail.get("baseline") == "done")
        p = qemu_io("write -P 0x51 0 1M", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        own_tansu.x2x("apply", name, "--until-caught-up")    # a checkpoint to lose
        own_tansu.lose_data()
        p = qemu_io("write -P 0x52 4M 64k", uri=cap.uri)
        assert "Input/output error" in p.stdout + p.stderr, p.stdout + p.stderr
        own_tansu.up()                                       # empty: a new cluster
        TALLY["broker outages"] += 1
        line = cap.wait_log("broker back", timeout=60)
        assert "marked extents" in line and f"x2x pair resync {name}" in line, line
        try:
            newest_capture_beat(s, name, lambda b: b.epoch == 2
                                and b.detail.get("resend") == "done")
        except AssertionError:
            bs = [(b.epoch, b.state, b.at_ms, b.detail.get("resend")) for b in read_beats(s)]
            print("BEATS", bs[-8:], own_tansu.x2x("status", "--json", check=False))
            raise AssertionError(''.join(l for l in cap.err if 'rdkafka' not in l)[-8000:]) from None
        p = qemu_io("write -P 0x53 8M 64k", "flush", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        # The old checkpoint is not in the new journal: refused, with the way out.
        lost = own_tansu.x2x("apply", name, "--until-caught-up", check=False)
        assert lost.returncode != 0 and f"x2x pair resync {name}" in lost.stderr, lost.stderr
        # Replaying what is left from scratch would look consistent and be wrong: refused.
        before = Path(spec.target).read_bytes()
        fresh = own_tansu.x2x("apply", name, "--reset", "--until-caught-up", check=False)
        assert fresh.returncode != 0 and "cannot be rebuilt by replaying" in fresh.stderr, \
            fresh.stderr
        assert Path(spec.target).read_bytes() == before           # nothing applied
        # The running capturer answers the resync: hashes, then only what differs.
        r = own_tansu.x2x("pair", "resync", name, "--json")
        out = json.loads(r.stdout)
        assert 0 < out["differing"] and out["resent_bytes"] < size // 2, out
        assert control.get_pair(s, name).state == "created"  # resynced
        p = qemu_io("write -P 0x54 12M 64k", "flush", uri=cap.uri)   # streaming goes on
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        own_tansu.x2x("apply", name, "--until-caught-up")
        assert converged(spec.source, spec.target)
        assert "stopped (clean)" in cap.stop()
    finally:
        cap.kill()
    own_tansu.x2x("apply", name, "--until-caught-up")
    assert converged(spec.source, spec.target)


def test_degraded_heartbeat_carries_the_dirty_bytes(own_broker: OwnBroker, tmp_path,
                                                    monkeypatch):
    """In process, to look inside while the broker is frozen (nobody can read x2x.status
    then): the capturer says degraded, counts the marked bytes, and clears them once the
    resync's FLUSH is acknowledged."""
    need("qemu-io")
    import producers.recovery as recovery
    from producers.health import Condition
    from producers.nbd_capture import NBDCapture
    monkeypatch.setattr(recovery, "STALL", 2.0)
    s, name = own_broker.settings(), "outage-inproc"
    spec = make_pair(s, name, tmp_path, 8 * MiB, seed=23)
    cap = NBDCapture(spec, s, "127.0.0.1", 0).start()
    try:
        deadline = time.monotonic() + 30
        while not (cap.baseline and cap.baseline.finished) or cap.intent.dirty_bytes():
            assert time.monotonic() < deadline, str(cap.detail())
            time.sleep(0.1)
        own_broker.freeze()
        p = qemu_io("write -P 0x61 0 256k", "write -P 0x62 4M 64k", "flush", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        deadline = time.monotonic() + 30
        while cap.health.condition is not Condition.DEGRADED:
            assert time.monotonic() < deadline, cap.detail()
            time.sleep(0.1)
        detail = cap.detail()
        assert int(detail["dirty_bytes"]) == 256 * 1024 + 64 * 1024, detail
        assert cap.health.reason and cap.detail()["error"] == cap.health.reason[:300]
        # x2x status on this host, broker unreachable: the error, and what the capturer
        # last said (its beat after going degraded, kept locally).
        cap.beat(force=True)
        st = run_x2x("status", name, check=False, timeout=60,
                     env={**os.environ, "X2X_BOOTSTRAP": own_broker.bootstrap})
        assert st.returncode == 1 and "cannot reach Kafka" in st.stderr, st.stderr
        assert "capturers on this host" in st.stdout
        assert "degraded" in st.stdout and "320.0 KiB dirty" in st.stdout, st.stdout
        own_broker.thaw()
        TALLY["broker outages"] += 1
        deadline = time.monotonic() + 60
        while cap.health.condition is not Condition.CAPTURING or cap.intent.dirty_bytes():
            assert time.monotonic() < deadline, cap.detail()
            time.sleep(0.1)
        assert cap.detail()["resend"] == "done" and cap.detail()["outages"] == "1"
        assert cap.stop().clean
    finally:
        own_broker.thaw()
        cap.stop()
    own_broker.x2x("apply", name, "--until-caught-up")
    assert converged(spec.source, spec.target)


def test_journal_lost_while_the_capturer_was_stopped_is_caught_at_its_next_start(
        settings, pair_name, tmp_path):
    """The topic is deleted and recreated while no capturer runs: the next start notices
    that its last acknowledged record is gone before journaling anything into the new
    topic, marks the pair, and the running capturer answers the hash resync."""
    need("qemu-io")
    from infra.topics import JOURNAL_CONFIG, delete_topic, ensure_topic, journal_topic
    size = 8 * MiB
    spec = make_pair(settings, pair_name, tmp_path, size, seed=24, data_fraction=0.5)
    cap = start_capturer(pair_name)
    try:
        wait_beat(settings, pair_name, lambda b: b.detail.get("baseline") == "done")
        run_x2x("apply", pair_name, "--until-caught-up")
        assert "stopped (clean)" in cap.stop()
    finally:
        cap.kill()
    admin = settings.check_reachable()
    delete_topic(admin, journal_topic(pair_name))
    time.sleep(0.5)
    ensure_topic(admin, journal_topic(pair_name), JOURNAL_CONFIG)
    cap = start_capturer(pair_name)
    try:
        assert "the journal lost its history" in cap.banner, cap.banner
        assert f"x2x pair resync {pair_name}" in cap.banner, cap.banner
        assert "epoch 2" in cap.banner, cap.banner
        assert control.get_pair(settings, pair_name).journal_lost
        p = qemu_io("write -P 0x61 3M 64k", "flush", uri=cap.uri)
        assert p.returncode == 0 and "failed" not in p.stdout, p.stdout + p.stderr
        r = json.loads(run_x2x("pair", "resync", pair_name, "--json").stdout)
        assert r["differing"] == 1 and r["resent_bytes"] == 64 * 1024, r
        assert r["bytes_sent"] < size // 10
        assert control.get_pair(settings, pair_name).state == "created"
        assert converged(spec.source, spec.target)
        assert "stopped (clean)" in cap.stop()
    finally:
        cap.kill()
    # The target is whole again, the journal is not: a replica cannot be built by replay...
    replica = tmp_path / "replica.img"
    refused = run_x2x("replica", "add", pair_name, "--target", str(replica), "--at", "now",
                      check=False)
    assert refused.returncode != 0 and "cannot be rebuilt by replaying" in refused.stderr, \
        refused.stderr
    assert not replica.exists() or not any(replica.read_bytes())
    # ... until a full baseline is in the journal again.
    cap = start_capturer(pair_name, "--rebaseline")
    try:
        wait_beat(settings, pair_name, lambda b: b.epoch == 3
                  and b.detail.get("baseline") == "done")
        deadline = time.monotonic() + 30
        while not control.get_pair(settings, pair_name).replayable:
            assert time.monotonic() < deadline, "no baseline-complete announced"
            time.sleep(0.2)
        assert "stopped (clean)" in cap.stop()
    finally:
        cap.kill()
    run_x2x("replica", "add", pair_name, "--target", str(replica), "--at", "now")
    assert converged(spec.source, str(replica))
    TALLY["broker outages"] += 1


def test_a_pairs_tail_forgets_the_pairs_of_a_broker_that_lost_its_data(
        own_tansu: OwnBroker) -> None:
    """A service that folds the pairs once and then follows the control topics (the
    failover watcher) sees the broker come back empty and new pairs created on it: it
    folds again from the new topics, and the pairs that went with the old ones are gone
    from its view instead of living on beside the new."""
    from journal.pairs import PairSpec
    s = own_tansu.settings()
    control.create_pair(s, PairSpec("before-loss", "/src", "/dst", 65536, 1 << 20))
    tail = control.PairsTail(s)
    try:
        assert set(tail.pairs()) == {"before-loss"}
        own_tansu.lose_data()
        own_tansu.up()                                       # empty: a new cluster
        control.create_pair(s, PairSpec("after-loss", "/src", "/dst", 65536, 1 << 20))
        deadline, seen = time.monotonic() + 60, set(tail.pairs())
        while seen != {"after-loss"} and time.monotonic() < deadline:
            assert "after-loss" not in seen or "before-loss" not in seen, \
                f"the old broker's pairs live on beside the new ones: {seen}"
            time.sleep(0.5)
            seen = set(tail.pairs())
        assert seen == {"after-loss"}, seen
    finally:
        tail.close()
