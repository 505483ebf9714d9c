"""The journal pipeline end to end on a real broker: scan capturer -> journal -> applier."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control
from infra.topics import JOURNAL_CONFIG, delete_topic, ensure_topic, journal_topic

from journal.batch import Sequencer
from journal.errors import (CorruptEntry, ExtentOutOfRange, JournalLost, PairNotFound, SeqGap,
                            StaleEpoch, UnknownFingerprint, VolumeError)
from journal.ops import Op
from journal.events import EpochAbandoned
from journal.pairs import PairSpec
from producers.scan import scan_once
from schemas import codec
from tests.conftest import make_image, run_x2x, same_bytes, x2x_bin

MiB = 1 << 20


def create(settings, name: str, src: Path, dst: Path, block: int = 65536) -> PairSpec:
    spec = PairSpec(name, str(src), str(dst), block, src.stat().st_size)
    if not dst.exists():
        with open(dst, "wb") as f:
            f.truncate(spec.volume_size)
    control.create_pair(settings, spec)
    return spec


def mutate(path: Path, fraction: float, seed: int, block: int = 4096) -> int:
    """Overwrite ``fraction`` of the 4 KiB blocks at random; returns bytes changed."""
    rng = random.Random(seed)
    size = path.stat().st_size
    n = int(size // block * fraction)
    with open(path, "r+b") as f:
        for i in rng.sample(range(size // block), n):
            f.seek(i * block)
            f.write(rng.randbytes(block))
    return n * block


def test_baseline_then_incremental_equals_source(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 32 * MiB, seed=7, data_fraction=0.6)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)

    base = scan_once(spec, settings)
    assert base.baseline and base.epoch == 1 and base.first_seq == 1
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert same_bytes(src, dst)
    # Zero extents travel as ZERO ops: far fewer bytes than the volume.
    assert base.bytes_sent < 0.75 * spec.volume_size

    changed = mutate(src, 0.01, seed=8)
    inc = scan_once(spec, settings)
    assert not inc.baseline and inc.epoch == 1 and inc.first_seq == base.last_seq + 1
    # Only blocks that changed are sent (each changed 4 KiB dirties one 64 KiB block).
    assert inc.bytes_changed <= changed * 16 and inc.bytes_sent < 0.5 * spec.volume_size
    stats = Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert stats.bytes_applied == inc.bytes_changed
    assert same_bytes(src, dst)

    # Nothing changed: the scan publishes just its FLUSH.
    idle = scan_once(spec, settings)
    assert idle.blocks_changed == 0 and idle.last_seq == idle.first_seq


def test_zeroed_blocks_are_zeroed_on_target(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=3, data_fraction=1.0)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)
    scan_once(spec, settings)
    with open(src, "r+b") as f:
        f.seek(MiB)
        f.write(bytes(3 * MiB))
    scan_once(spec, settings)
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert same_bytes(src, dst)


def test_data_punched_into_holes_is_zeroed_on_target_and_only_once(
        settings, pair_name, tmp_path):
    """A scan passes a hole as whole blocks at once; where the journaled map knew data
    there, only those blocks are journaled (as ZERO), and a hole it knew is not again."""
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=5, data_fraction=1.0)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)
    scan_once(spec, settings)
    subprocess.run(["fallocate", "-p", "-o", str(MiB), "-l", str(2 * MiB), str(src)],
                   check=True)
    first = scan_once(spec, settings)
    assert (first.blocks_changed, first.bytes_changed) == (32, 2 * MiB)
    # Half of this hole was one already (and journaled as such): the other half goes.
    subprocess.run(["fallocate", "-p", "-o", str(2 * MiB), "-l", str(2 * MiB), str(src)],
                   check=True)
    second = scan_once(spec, settings)
    assert (second.blocks_changed, second.bytes_changed) == (16, MiB)
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert same_bytes(src, dst)
    assert scan_once(spec, settings).blocks_changed == 0


def test_cli_flow_and_status(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 16 * MiB, seed=11)
    dst = tmp_path / "dst.img"
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target", str(dst),
            "--create-target", "--block-size", "16KiB")
    shown = run_x2x("pair", "show", pair_name, "--json").stdout
    assert f'"block_size": {16 * 1024}' in shown
    assert pair_name in run_x2x("pair", "list").stdout
    out = run_x2x("capture", pair_name, "--once").stdout
    assert "baseline: epoch 1" in out
    out = run_x2x("apply", pair_name, "--until-caught-up").stdout
    assert "checkpoint epoch 1" in out
    assert same_bytes(src, dst)
    import json
    (row,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
    (rep,) = row["replicas"]
    assert row["captured_seq"] == rep["applied_seq"] > 0
    assert rep["lag_ops"] == 0 and rep["rpo_s"] == 0.0
    run_x2x("pair", "delete", pair_name)
    gone = run_x2x("pair", "show", pair_name, check=False)
    assert gone.returncode == 1 and f"no pair named '{pair_name}'" in gone.stderr


def test_more_than_the_staging_budget_between_points_is_written_in_the_background(
        settings, pair_name, tmp_path):
    """A baseline is one stretch without a consistency point: past the staging budget the
    target runs ahead of its checkpoint, and from then on each half budget goes to disk on
    a thread of its own while the next records are read and checked."""
    src = make_image(tmp_path / "src.img", 24 * MiB, seed=21, data_fraction=1.0)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)
    last = scan_once(spec, settings).last_seq
    threads: set[str] = set()

    def progress(_applier: Applier) -> None:
        threads.update(t.name for t in threading.enumerate())

    stats = Applier(spec, str(dst), settings, stage_limit=2 * MiB).run(until_caught_up=True,
                                                                       on_progress=progress)
    assert any(n.startswith("x2x-apply") for n in threads), threads
    # What the run says its target took: one writer at a time, so within the run.
    assert 0 < stats.write_s <= stats.seconds, stats
    assert 0 <= stats.write_wait_s <= stats.seconds, stats
    assert same_bytes(src, dst)
    assert CheckpointStore(pair_name, str(dst)).load().position.seq == last


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs (a target that runs "
                    "out of space) needs root")
def test_a_failed_write_to_the_target_is_a_clear_error_and_not_checkpointed(
        settings, pair_name, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(small)], check=True)
    try:
        src = make_image(tmp_path / "src.img", 16 * MiB, seed=22, data_fraction=1.0)
        dst = small / "dst.img"
        spec = create(settings, pair_name, src, dst)
        scan_once(spec, settings)
        # The first overflow (2 MiB) fits; writes after it go in the background.
        with pytest.raises(VolumeError, match=re.escape(
                f"writing to the target {dst} failed: No space left on device. Its "
                f"checkpoint stays at epoch 0 seq 0; once the target is fixed (space, "
                f"device), 'x2x apply {pair_name}' applies again from there")):
            Applier(spec, str(dst), settings, stage_limit=2 * MiB).run(until_caught_up=True)
        assert CheckpointStore(pair_name, str(dst)).load() is None
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_applier_killed_mid_stream_resumes_to_an_equal_target(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 96 * MiB, seed=5, data_fraction=0.9)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst, block=65536)
    # Several consistency points, so there are checkpoints to resume from.
    last = 0
    for i in range(4):
        mutate(src, 0.05, seed=100 + i)
        last = scan_once(spec, settings).last_seq
    store = CheckpointStore(pair_name, str(dst))
    kills, reached = 0, 0
    for _ in range(2):
        proc = subprocess.Popen([x2x_bin(), "apply", pair_name, "--until-caught-up"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Killed mid-stream: as soon as it checkpoints a point past the last kill's and
        # short of the end (a fixed delay killed it after its end on a quick machine).
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            cp = store.load()
            if cp is not None and reached < cp.position.seq < last:
                proc.send_signal(signal.SIGKILL)
                kills, reached = kills + 1, cp.position.seq
                break
            time.sleep(0.01)
        proc.wait(60)
    assert kills >= 1, "the applier finished before it could be killed; make the journal larger"
    before = store.load()
    run_x2x("apply", pair_name, "--until-caught-up")
    after = store.load()
    assert after.position.seq > (before.position.seq if before else 0)
    assert same_bytes(src, dst)


# -- bad input: a clear error, nothing applied -----------------------------------------
def test_unknown_pair(settings):
    proc = run_x2x("capture", "no-such-pair", "--once", check=False)
    assert proc.returncode == 1 and "no pair named 'no-such-pair'" in proc.stderr
    with pytest.raises(PairNotFound, match="create it with"):
        control.get_pair(settings, "no-such-pair")


def test_source_missing(broker, tmp_path):
    proc = run_x2x("pair", "create", "p-missing", "--source", str(tmp_path / "nope.img"),
                   "--target", str(tmp_path / "t.img"), check=False)
    assert proc.returncode == 1 and "nope.img does not exist" in proc.stderr


def test_target_missing_or_smaller(broker, tmp_path):
    src = make_image(tmp_path / "src.img", MiB)
    proc = run_x2x("pair", "create", "p-small", "--source", str(src), "--target",
                   str(tmp_path / "t.img"), check=False)
    assert proc.returncode == 1 and "t.img does not exist" in proc.stderr
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    proc = run_x2x("pair", "create", "p-small", "--source", str(src), "--target", str(small),
                   check=False)
    assert proc.returncode == 1 and "smaller than source" in proc.stderr
    assert "p-small" not in run_x2x("pair", "list").stdout


def test_bad_pair_name_and_block_size(broker, tmp_path):
    src = make_image(tmp_path / "src.img", MiB)
    proc = run_x2x("pair", "create", "bad/name", "--source", str(src), "--target", str(src),
                   check=False)
    assert proc.returncode == 2 and "pair name 'bad/name' is invalid" in proc.stderr
    proc = run_x2x("pair", "create", "okname", "--source", str(src), "--target", str(src),
                   "--block-size", "3000", check=False)
    assert proc.returncode == 2 and "block size 3000 is invalid" in proc.stderr


def test_duplicate_pair_is_refused(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", MiB)
    create(settings, pair_name, src, tmp_path / "dst.img")
    proc = run_x2x("pair", "create", pair_name, "--source", str(src), "--target",
                   str(tmp_path / "dst.img"), check=False)
    assert proc.returncode == 1 and "exists already" in proc.stderr


def test_source_resized_after_create_is_refused(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", MiB)
    spec = create(settings, pair_name, src, tmp_path / "dst.img")
    with open(src, "ab") as f:
        f.write(b"x" * 4096)
    proc = run_x2x("capture", pair_name, "--once", check=False)
    assert proc.returncode == 1 and "was created for 1048576" in proc.stderr


def test_target_shrunk_below_source_is_refused_at_apply(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", MiB)
    dst = tmp_path / "dst.img"
    create(settings, pair_name, src, dst)
    os.truncate(dst, 4096)
    proc = run_x2x("apply", pair_name, "--until-caught-up", check=False)
    assert proc.returncode == 1 and "smaller than the source" in proc.stderr


def _produce(settings, name: str, *values: bytes) -> None:
    p = Producer(settings.producer())
    for v in values:
        p.produce(journal_topic(name), v)
    assert p.flush(10) == 0


def _good_then(settings, spec: PairSpec, dst: Path, bad: bytes, expect, match: str):
    """Apply a good consistency point, then a bad record: refused, target at checkpoint."""
    seq = Sequencer(spec.name, 1)
    good = seq.add(Op.write(0, b"A" * 4096), 1) + seq.add(Op.flush(), 1)
    _produce(settings, spec.name, *(codec.encode_entry(e) for e in good))
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    snapshot = dst.read_bytes()
    cp = CheckpointStore(spec.name, str(dst)).load()
    _produce(settings, spec.name, bad)
    with pytest.raises(expect, match=match):
        Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert dst.read_bytes() == snapshot
    assert CheckpointStore(spec.name, str(dst)).load() == cp
    assert control.get_pair(settings, spec.name).state == "needs-resync"
    return seq


def _bad_setup(settings, pair_name, tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(bytes(MiB))
    dst = tmp_path / "dst.img"
    return create(settings, pair_name, src, dst), dst


def test_corrupted_record_is_refused(settings, pair_name, tmp_path):
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    e = Sequencer(pair_name, 1, next_seq=3)
    e.add(Op.write(8192, b"B" * 4096), 1)
    entry = e.add(Op.flush(), 2)[0]
    raw = bytearray(codec.encode_entry(entry))
    raw[200] ^= 0xFF                        # a bit flip inside the payload
    _good_then(settings, spec, dst, bytes(raw), CorruptEntry, "digest mismatch at .* offset 1 .*seq 3..4")


def test_unknown_fingerprint_is_refused(settings, pair_name, tmp_path):
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    raw = bytearray(codec.encode_entry(Sequencer(pair_name, 1, next_seq=3).add(Op.flush(), 1)[0]))
    raw[2:10] = b"\x11" * 8
    _good_then(settings, spec, dst, bytes(raw), UnknownFingerprint, "1111111111111111")


def test_seq_gap_is_refused(settings, pair_name, tmp_path):
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    s = Sequencer(pair_name, 1, next_seq=9)
    s.add(Op.write(0, b"C" * 4096), 1)
    gap = s.add(Op.flush(), 1)[0]
    _good_then(settings, spec, dst, codec.encode_entry(gap), SeqGap,
               "jumps from seq 2 to 9")


def test_extent_outside_target_is_refused(settings, pair_name, tmp_path):
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    s = Sequencer(pair_name, 1, next_seq=3)
    s.add(Op.write(MiB - 10, b"D" * 4096), 1)
    _good_then(settings, spec, dst, codec.encode_entry(s.add(Op.flush(), 1)[0]),
               ExtentOutOfRange, "outside the target")


def test_record_of_another_pair_is_refused(settings, pair_name, tmp_path):
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    s = Sequencer("someone-else", 1, next_seq=3)
    _good_then(settings, spec, dst, codec.encode_entry(s.add(Op.flush(), 1)[0]),
               CorruptEntry, "belongs to pair 'someone-else'")


def test_topic_recreated_under_the_applier(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=2)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)
    for i in range(3):
        mutate(src, 0.1, seed=i)
        scan_once(spec, settings)
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    snapshot = dst.read_bytes()
    admin = settings.check_reachable()
    delete_topic(admin, journal_topic(pair_name))
    time.sleep(0.5)
    ensure_topic(admin, journal_topic(pair_name), JOURNAL_CONFIG)
    proc = run_x2x("apply", pair_name, "--until-caught-up", check=False, timeout=120)
    assert proc.returncode == 1
    assert "is not in the journal" in proc.stderr and "nothing was applied" in proc.stderr
    assert f"x2x pair resync {pair_name}" in proc.stderr
    assert dst.read_bytes() == snapshot
    # Meanwhile the source changed; then the way out the message names: a resync by block
    # hashes sends the hash map and the changed blocks only, not the volume.
    with open(src, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(256 * 1024))          # 4 blocks of 64 KiB
    r = json.loads(run_x2x("pair", "resync", pair_name, "--json").stdout)
    assert (r["blocks"], r["differing"]) == (64, 4)
    assert r["hash_bytes"] == 64 * 32 and r["resent_bytes"] == 256 * 1024
    assert r["bytes_sent"] < src.stat().st_size // 10
    assert same_bytes(src, dst)
    assert control.get_pair(settings, pair_name).state == "created"
    # And replication goes on in the new epoch.
    mutate(src, 0.05, seed=10)
    scan_once(spec, settings)
    run_x2x("apply", pair_name, "--until-caught-up")
    assert same_bytes(src, dst)


def test_broker_unreachable_is_a_clear_error_not_a_hang(tmp_path):
    from tests.conftest import free_port
    port = free_port()
    t0 = time.monotonic()
    proc = run_x2x("--bootstrap", f"127.0.0.1:{port}", "pair", "list", check=False,
                   timeout=60)
    assert time.monotonic() - t0 < 45
    assert proc.returncode == 1
    assert f"cannot reach Kafka at 127.0.0.1:{port}" in proc.stderr


def test_garbage_on_the_status_topic_does_not_stop_status_or_apply(settings, pair_name,
                                                                   tmp_path):
    from infra.topics import STATUS_TOPIC, ensure_base_topics
    ensure_base_topics(settings.check_reachable())      # x2x never produces to a missing topic
    p = Producer(settings.producer())
    errors: list[str] = []
    # Keyed: the status topic is compacted, and Kafka refuses a record without a key there.
    p.produce(STATUS_TOPIC, b"not a heartbeat", key=b"garbage",
              on_delivery=lambda err, _m: err and errors.append(err.str()))
    assert p.flush(10) == 0 and not errors, errors
    src = make_image(tmp_path / "src.img", MiB, seed=4)
    dst = tmp_path / "dst.img"
    spec = create(settings, pair_name, src, dst)
    scan_once(spec, settings)
    Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert same_bytes(src, dst)
    assert pair_name in run_x2x("status").stdout


def test_late_record_of_an_abandoned_epoch_is_skipped_and_of_any_other_refused(
        settings, pair_name, tmp_path):
    """A record of epoch 1 that the broker writes after epoch 2's: refused (an old capturer
    may still publish) unless the capturer announced that it gave epoch 1 up, in which
    case it is stale (epoch 2 resent its blocks) and skipped."""
    spec, dst = _bad_setup(settings, pair_name, tmp_path)
    one, two = Sequencer(pair_name, 1), Sequencer(pair_name, 2)
    first = one.add(Op.write(0, b"A" * 4096), 1) + one.add(Op.flush(), 1)
    late = one.add(Op.write(0, b"C" * 4096), 2) + one.add(Op.flush(), 2)
    second = two.add(Op.write(0, b"B" * 4096), 3) + two.add(Op.flush(), 3)
    _produce(settings, pair_name, *(codec.encode_entry(e) for e in first + second + late))
    with pytest.raises(StaleEpoch, match="entry of epoch 1 .* arrived after epoch 2"):
        Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert dst.read_bytes()[:4096] == b"B" * 4096        # the late record: not applied
    control.publish(settings, EpochAbandoned(pair=pair_name, at_ms=1, epoch=1, successor=2))
    more = two.add(Op.write(4096, b"D" * 4096), 4) + two.add(Op.flush(), 4)
    _produce(settings, pair_name, *(codec.encode_entry(e) for e in more))
    stats = Applier(spec, str(dst), settings).run(until_caught_up=True)
    assert stats.stale_skipped == 1
    assert dst.read_bytes()[:8192] == b"B" * 4096 + b"D" * 4096
