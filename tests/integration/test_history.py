"""The bounded journal on a real broker: a history base follows a short window, records
leave Kafka (DeleteRecords), broker bytes stay bounded, and replicas start from the base.

The window is a few seconds instead of a minute to keep the tests short; what bounds the
broker's bytes is the same: the window, the base's cycle, Kafka's retention check and
one segment."""
from __future__ import annotations

import json
import random
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from consumers.applier import Applier
from consumers.base import HistoryBase
from infra import control, retention
from infra.apache_kafka import partition_bytes
from infra.broker import broker_dir
from infra.topics import journal_topic
from journal.errors import BehindBase
from journal.history import HistorySettings, readers_of
from infra.heartbeat import read_beats
from journal.pairs import PairSpec
from producers.scan import scan_once
from tests.conftest import make_image, run_x2x, same_bytes
from tests.integration.test_replication import create

MiB = 1 << 20
SIZE = 8 * MiB


def rewrite(path: Path, rng: random.Random) -> None:
    """New random bytes in every block: a scan journals the whole volume again."""
    with open(path, "r+b") as f:
        f.write(rng.randbytes(SIZE))


class Running:
    """A service in a thread, stopped at the end of the test."""

    def __init__(self, target) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            try:
                target(self.stop)
            except BaseException as e:       # surfaced by close()
                self.error = e
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error


def windowed(settings, name: str, tmp_path: Path, window: str = "2s",
             limit: str = "16MiB") -> PairSpec:
    src = make_image(tmp_path / "src.img", SIZE, seed=5, data_fraction=1.0)
    spec = create(settings, name, src, tmp_path / "dst.img")
    # 16 MiB limit: 1 MiB segments, so the disk follows the deletions closely.
    control.set_history(settings, name, HistorySettings.parse(window, limit))
    return spec


def base_of(spec: PairSpec, settings, tmp_path: Path) -> HistoryBase:
    return HistoryBase(spec, str(tmp_path / "base.img"), settings, interval=0.3)


def test_soak_20x_the_volume_keeps_broker_bytes_bounded_and_loses_nothing(
        settings, pair_name, tmp_path, record_property):
    spec = windowed(settings, pair_name, tmp_path)
    rng = random.Random(1)
    topic = journal_topic(spec.name)
    base = Running(base_of(spec, settings, tmp_path).run)
    app = Running(lambda stop: Applier(spec, spec.target, settings).run(stop=stop))
    written, peak, samples, scans = 0, 0, [], []
    try:
        for i in range(21):                   # a baseline, then 20 whole rewrites
            if i:
                rewrite(Path(spec.source), rng)
            sent = scan_once(spec, settings).bytes_sent
            written += sent
            scans.append((time.monotonic(), sent))
            held = partition_bytes(broker_dir(), topic)
            samples.append(held)
            peak = max(peak, held)
            # The bound: what was written during the window, the base's cycle, Kafka's
            # retention check and segment delete delay (5 s + 1 s, infra/apache_kafka.py),
            # plus slack and two 1 MiB segments; not what was written since the start.
            recent = sum(n for t, n in scans if t > time.monotonic() - (2 + 0.3 + 6 + 2))
            assert held <= recent + 2 * MiB, (i, held, recent)
            if i == 10:                       # a restart of the base keeps the window
                base.close()
                base = Running(base_of(spec, settings, tmp_path).run)
            if i == 14:                       # the applier stops for a while: it still
                app.close()                   # holds what it needs, and resumes
            if i == 16:
                app = Running(lambda stop: Applier(spec, spec.target, settings).run(stop=stop))
            time.sleep(1.0)                   # ~8 MiB/s: the run outlasts the bound below
        # Settle: the window passes, the base applies, Kafka's check frees the segments.
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            held = partition_bytes(broker_dir(), topic)
            if held <= 4 * MiB:
                break
            time.sleep(1)
        low, high = retention.watermarks(settings, spec.name)
        time.sleep(0.5)                       # a base beat after the last deletion
        (st,) = json.loads(run_x2x("status", spec.name, "--json").stdout)
        text = run_x2x("status", spec.name).stdout
    finally:
        base.close()
        app.close()
    record_property("journal_bytes_written", written)
    record_property("broker_bytes_peak", peak)
    record_property("broker_bytes_end", held)
    print(f"\nsoak: wrote {written / MiB:.0f} MiB of journal ({written / SIZE:.0f}x the "
          f"volume); broker held at most {peak / MiB:.1f} MiB, {held / MiB:.1f} MiB at the "
          f"end; journal offsets {low}..{high}; samples MiB "
          f"{[round(s / MiB, 1) for s in samples]}")
    assert written >= 20 * SIZE
    assert low > 0, "the base deleted nothing"
    assert peak < written / 2, "broker bytes grew with what was written"
    assert held <= 4 * MiB
    # Status: the window configured and actual, what the journal holds, the oldest point.
    h = st["history"]
    assert st["history_window_ms"] == 2000 and h["window_ms"] == 2000
    assert h["low"] >= low - 10 and h["high"] >= h["low"]
    assert h["restorable_ms"] is not None and h["held_payload"] is not None
    assert st["history_warnings"] == []
    print(text)
    assert "oldest restorable" in text and "2s" in text and "warning" not in text
    # Nothing lost: the pair's target (a registered reader) equals the source ...
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    assert same_bytes(spec.source, spec.target)
    # ... and a replica built now, after most history left the journal, too (from the
    # base this host runs, found through its heartbeat).
    out = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "late.img"),
                  "--at", "now").stdout
    assert "stopped by limit" in out
    assert same_bytes(spec.source, tmp_path / "late.img")


def test_point_in_time_inside_the_window_and_a_replica_behind_the_base(
        settings, pair_name, tmp_path):
    spec = windowed(settings, pair_name, tmp_path, window="3s")
    rng = random.Random(2)
    base_img = str(tmp_path / "base.img")
    scan_once(spec, settings)
    # A point-in-time drill early on: built by replay from offset 0, then released.
    early = tmp_path / "early.img"
    run_x2x("replica", "add", spec.name, "--target", str(early), "--at", "now")
    assert same_bytes(early, spec.source)
    base = Running(base_of(spec, settings, tmp_path).run)
    snaps: list[tuple[str, Path]] = []
    try:
        for i in range(10):
            rewrite(Path(spec.source), rng)
            scan_once(spec, settings)
            snap = tmp_path / f"snap{i}.img"
            shutil.copy(spec.source, snap)
            now = time.time()
            snaps.append((time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) +
                          f".{int(now * 1000) % 1000:03d}Z", snap))
            time.sleep(0.5)
        low, _ = retention.watermarks(settings, spec.name)
        assert low > 0, "the base deleted nothing"
        # The base stops here: running on, it would trim past the point below once the
        # 3 s window passes it, which a loaded machine can take that long to reach.
        base.close()
        # A point inside the window, after most history left the journal.
        at, snap = snaps[-2]
        out = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "pit.img"),
                      "--base", base_img, "--at", at).stdout
        assert "stopped by limit" in out
        assert re.search(r"\(writing the target \d+\.\d\d s, reading waited for it "
                         r"\d+\.\d\d s\)", out), out
        assert same_bytes(tmp_path / "pit.img", snap)
        # A point before the base is refused, saying what the oldest one is.
        proc = run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "old.img"),
                       "--base", base_img, "--at", snaps[0][0], check=False)
        assert proc.returncode == 2 and "before the oldest point that can be restored" in \
            proc.stderr, proc.stderr
    finally:
        base.close()
    # The early drill released the journal; following it now is behind the base: a clear
    # error naming the way back, nothing applied ...
    before = early.read_bytes()
    with pytest.raises(BehindBase, match="--reseed"):
        Applier(spec, str(early), settings).run(until_caught_up=True)
    assert early.read_bytes() == before
    proc = run_x2x("replica", "add", spec.name, "--target", str(early), "--at", "now",
                   check=False)
    assert proc.returncode != 0 and "--reseed" in proc.stderr, proc.stderr
    # ... and the way back: re-seed from the base, then follow.
    run_x2x("replica", "add", spec.name, "--target", str(early), "--base", base_img,
            "--reseed", "--at", "now")
    assert same_bytes(early, spec.source)
    # A replica given up on holds nothing.
    # A seeded point-in-time replica that reached its point (the journal's end) too.
    run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "pit2.img"),
            "--base", base_img, "--seq", "99:1")
    run_x2x("replica", "release", spec.name, "--target", str(early))
    needs = {r.instance: r.needs for r in readers_of(read_beats(settings), spec.name)}
    assert needs[str(early)] is None and needs[str(tmp_path / "pit2.img")] is None


def test_over_its_limit_the_window_shrinks_with_a_warning_and_writes_go_on(
        settings, pair_name, tmp_path, caplog):
    spec = windowed(settings, pair_name, tmp_path, window="1h")    # limit 16 MiB
    rng = random.Random(3)
    base = Running(base_of(spec, settings, tmp_path).run)
    app = Running(lambda stop: Applier(spec, spec.target, settings).run(stop=stop))
    written = 0
    try:
        for _ in range(8):                    # 64 MiB into a 1 h window: 4x the limit
            rewrite(Path(spec.source), rng)
            t0 = time.monotonic()
            written += scan_once(spec, settings).bytes_sent
            assert time.monotonic() - t0 < 30   # the source is never held back
            time.sleep(0.5)
        deadline = time.monotonic() + 30
        while True:
            (st,) = json.loads(run_x2x("status", spec.name, "--json").stdout)
            h = st["history"]
            if h["held_payload"] is not None and h["held_payload"] <= 16 * MiB:
                break
            assert time.monotonic() < deadline, h
            time.sleep(1)
    finally:
        base.close()
        app.close()
    assert written >= 64 * MiB
    assert h["shrunk"] and h["actual_ms"] < 3_600_000 and h["low"] > 0
    assert any("over its limit" in w for w in st["history_warnings"])
    assert "over its limit" in caplog.text and "applies early" in caplog.text
    # Nothing lost: the target follows, and a replica from the base equals the source.
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    assert same_bytes(spec.source, spec.target)
    run_x2x("replica", "add", spec.name, "--target", str(tmp_path / "r.img"),
            "--base", str(tmp_path / "base.img"), "--at", "now")
    assert same_bytes(spec.source, tmp_path / "r.img")


def test_the_window_is_set_at_create_changed_later_and_shown(settings, pair_name, tmp_path):
    from confluent_kafka.admin import ConfigResource, ResourceType
    src = make_image(tmp_path / "src.img", SIZE, seed=9)
    out = run_x2x("pair", "create", pair_name, "--source", str(src), "--target",
                  str(tmp_path / "dst.img"), "--create-target", "--history", "24h",
                  "--journal-max", "50GiB").stdout
    assert "history 1d, max 50GiB" in out
    show = json.loads(run_x2x("pair", "show", pair_name, "--json").stdout)
    assert show["history"] == "1d, max 50GiB"

    def segment_bytes() -> int:
        res = ConfigResource(ResourceType.TOPIC, journal_topic(pair_name))
        admin = settings.check_reachable()    # held: its futures die with it
        cfg = admin.describe_configs([res])[res].result()
        return int(cfg["segment.bytes"].value)
    assert segment_bytes() == 1 << 30              # 50GiB / 16, at most 1 GiB
    run_x2x("pair", "history", pair_name, "--history", "90m")
    assert control.get_pair(settings, pair_name).history == HistorySettings(90 * 60_000)
    assert segment_bytes() == 64 * MiB
    # No base runs yet: status says the journal grows, and how to start one.
    text = run_x2x("status", pair_name).stdout
    assert "no base running" in text and f"x2x base {pair_name} --volume" in text
    proc = run_x2x("pair", "history", pair_name, "--history", "2 weeks", check=False)
    assert proc.returncode == 2 and "not a duration" in proc.stderr
    run_x2x("pair", "history", pair_name, "--history", "forever")
    assert not control.get_pair(settings, pair_name).history.bounded


def _stamp() -> str:
    # One reading of the clock: two could straddle a second and give a time ~1 s early.
    now = time.time()
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z")


def _versions(spec: PairSpec, settings, tmp_path: Path, n: int) -> list[tuple[str, Path]]:
    """``n`` rewrites of the source, each scanned, copied and stamped."""
    rng, snaps = random.Random(4), []
    for i in range(n):
        rewrite(Path(spec.source), rng)
        scan_once(spec, settings)
        snap = tmp_path / f"v{i}.img"
        shutil.copy(spec.source, snap)
        snaps.append((_stamp(), snap))
        time.sleep(0.4)
    return snaps


def test_forced_failover_to_a_point_inside_the_window(settings, pair_name, tmp_path):
    # A limit the run stays under: the window alone decides what leaves the journal.
    spec = windowed(settings, pair_name, tmp_path, window="4s", limit="256MiB")
    base_img = str(tmp_path / "base.img")
    scan_once(spec, settings)
    base = Running(base_of(spec, settings, tmp_path).run)
    app = Running(lambda stop: Applier(spec, spec.target, settings).run(stop=stop))
    try:
        try:
            snaps = _versions(spec, settings, tmp_path, 12)
        finally:
            # No base cycle moves the window from here on: while the applier catches up
            # below (seconds on a loaded machine), a running base would carry the 4 s
            # window past the point restored.
            base.close()
        deadline = time.monotonic() + 30
        while not same_bytes(spec.target, spec.source) and time.monotonic() < deadline:
            time.sleep(0.3)
    finally:
        app.close()             # the disaster: the applier service is stopped
    assert same_bytes(spec.target, spec.source)
    assert retention.watermarks(settings, spec.name)[0] > 0, "the base deleted nothing"
    # Bad input first: each refused by name, nothing promoted.
    proc = run_x2x("pair", "failover", spec.name, "--at", snaps[-2][0], check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr, proc.stderr
    proc = run_x2x("pair", "failover", spec.name, "--force", "--base", base_img, "--at",
                   snaps[0][0], check=False)
    assert proc.returncode == 2 and "before the oldest point that can be restored" in \
        proc.stderr, proc.stderr
    assert control.get_pair(settings, spec.name).state == "created"
    # Ransomware struck after the point: the target, already past it, comes back to it.
    at, snap = snaps[-3]
    out = run_x2x("pair", "failover", spec.name, "--force", "--base", base_img, "--at", at)
    assert "promoted" in out.stdout and "copying the history base" in out.stderr, out
    assert same_bytes(spec.target, snap)
    assert not same_bytes(spec.target, spec.source)
    st = control.get_pair(settings, spec.name)
    assert st.state == "promoted" and st.promotion.forced and st.promotion.rpo_ops > 0


def test_forced_failover_to_an_earlier_point_of_a_journal_kept_whole(
        settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", SIZE, seed=6, data_fraction=1.0)
    spec = create(settings, pair_name, src, tmp_path / "dst.img")
    scan_once(spec, settings)
    snaps = _versions(spec, settings, tmp_path, 4)
    Applier(spec, spec.target, settings).run(until_caught_up=True)
    at, snap = snaps[1]
    out = run_x2x("pair", "failover", spec.name, "--force", "--at", at)
    assert "from its start" in out.stderr, out.stderr
    assert same_bytes(spec.target, snap)
    assert control.get_pair(settings, spec.name).state == "promoted"
