"""Extra replicas and point-in-time replicas, built by replaying the journal."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from consumers import replica
from consumers.applier import Applier

from journal.errors import BadInput, VolumeError
from journal.pairs import PairSpec
from producers.scan import scan_once
from tests.conftest import make_image, run_x2x, same_bytes, x2x_bin
from tests.integration.test_replication import create, mutate

MiB = 1 << 20


@pytest.fixture
def history(settings, pair_name, tmp_path):
    """A pair with three scans; a copy of the source as of each scan's FLUSH."""
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=21, data_fraction=0.7)
    spec = create(settings, pair_name, src, tmp_path / "dst.img")
    snaps, results = [], []
    for i in range(3):
        if i:
            mutate(src, 0.05, seed=300 + i)
        results.append(scan_once(spec, settings))
        snaps.append(shutil.copy(src, tmp_path / f"snap{i}.img"))
    return spec, snaps, results


def test_point_in_time_at_a_seq_between_flushes_equals_the_earlier_flush(settings, history,
                                                                         tmp_path):
    spec, snaps, results = history
    mid = (results[2].first_seq + results[2].last_seq) // 2
    assert results[1].last_seq < mid < results[2].last_seq
    target = tmp_path / "pit.img"
    applier, stats = replica.build(spec, str(target), settings,
                                   replica.make_limit(settings, spec.name, None, f"1:{mid}", None))
    assert stats.stopped_by == "limit"
    assert applier.checkpointed.seq == results[1].last_seq
    assert same_bytes(target, snaps[1])
    assert not same_bytes(target, snaps[2])


def test_point_in_time_by_offset_and_exact_flush_seq(settings, history, tmp_path):
    spec, snaps, results = history
    target = tmp_path / "pit0.img"
    replica.build(spec, str(target), settings,
                  replica.make_limit(settings, spec.name, None, str(results[0].last_seq), None))
    assert same_bytes(target, snaps[0])
    target = tmp_path / "pit-offset.img"
    applier, _ = replica.build(spec, str(target), settings,
                               replica.make_limit(settings, spec.name, None, None, 0))
    assert applier.checkpointed.offset <= 0


def test_drill_at_now_while_replication_continues(settings, history, tmp_path):
    spec, snaps, _ = history
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    out = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "drill.img"),
                  "--at", "now").stdout
    assert "stopped by limit" in out
    assert same_bytes(tmp_path / "drill.img", snaps[2])
    # The pair's own target and checkpoint are untouched by the drill, and go on.
    mutate(Path(spec.source), 0.02, seed=999)
    scan_once(spec, settings)
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    assert same_bytes(spec.source, spec.target)
    assert same_bytes(tmp_path / "drill.img", snaps[2])


def test_live_replica_follows_and_several_replicas_are_independent(settings, history,
                                                                    tmp_path):
    spec, snaps, _ = history
    live = tmp_path / "live.img"
    proc = subprocess.Popen([x2x_bin(), "replica", "add", spec.name, "--target", str(live)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mutate(Path(spec.source), 0.05, seed=77)
        scan_once(spec, settings)
        deadline = time.monotonic() + 60
        while not (live.exists() and same_bytes(live, spec.source)):
            assert time.monotonic() < deadline, "live replica did not catch up in 60 s"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped by signal" in out
    # A second replica, a PIT one, has its own checkpoint and does not disturb the first.
    other = tmp_path / "other.img"
    run_x2x("replica", "add", spec.name, "--target", str(other), "--seq", "1:1")
    assert same_bytes(live, spec.source)


def test_at_before_the_journal_or_in_the_future_is_refused(settings, history, tmp_path):
    spec, _, _ = history
    proc = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "r.img"), "--at",
                   "2001-01-01T00:00:00Z", check=False)
    assert proc.returncode == 2 and "before the journal's first entry" in proc.stderr
    proc = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "r.img"), "--at",
                   "2999-01-01T00:00:00", check=False)
    assert proc.returncode == 2 and "is in the future" in proc.stderr
    proc = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "r.img"), "--at",
                   "yesterday", check=False)
    assert proc.returncode == 2 and "is not a time" in proc.stderr
    assert not (tmp_path / "r.img").exists()


def test_replica_target_too_small_or_the_pair_own_volume(settings, history, tmp_path):
    spec, _, _ = history
    small = tmp_path / "small.img"
    small.write_bytes(bytes(4096))
    with pytest.raises(VolumeError, match="smaller than the source"):
        replica.build(spec, str(small), settings, None)
    assert small.read_bytes() == bytes(4096)
    with pytest.raises(BadInput, match="own source or target"):
        replica.build(spec, spec.target, settings, None)


def test_conflicting_point_options_are_refused(settings, history):
    spec, _, _ = history
    with pytest.raises(BadInput, match="at most one of"):
        replica.make_limit(settings, spec.name, "now", "1:3", None)
    with pytest.raises(BadInput, match="--seq 'x:y' is invalid"):
        replica.make_limit(settings, spec.name, None, "x:y", None)
