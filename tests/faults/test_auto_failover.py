"""Automatic failover without split brain, on real networks: the source's capturer runs in
a network namespace of its own, reaching the broker over a veth pair (tests/net.py); the
target side's watchers run beside the broker. Cutting the veth link is a real network
cut: silence, no reset.

Every scenario checks the workload's own invariant: each write a client was told is done
(qemu-io write + flush, in flush-sync mode) is on the promoted target, which holds a
prefix of the writes."""
from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from consumers.checkpoint import CheckpointStore
from infra import control
from infra.heartbeat import read_beats
from journal.clock import now_ms
from journal.plans import FRESH_S
from journal.status import newest
from tests.conftest import free_port, make_image, run_x2x
from tests.faults.conftest import TALLY, Proc
from tests.net import SourceNet
from tests.integration.test_replication import create

BLOCK = 4096
SIZE = 16 << 20


class Writer:
    """A client in the source's namespace: block i gets pattern i % 250 + 1, each write
    followed by a flush; records which were acknowledged, and when."""

    def __init__(self, prefix: tuple[str, ...], uri: str) -> None:
        self.prefix, self.uri = prefix, uri
        self.acked: dict[int, float] = {}
        self.failed: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def write(self, i: int) -> bool:
        p = subprocess.run([*self.prefix, "qemu-io", "-f", "raw", "-c",
                            f"write -P {i % 250 + 1} {i * BLOCK} {BLOCK}", "-c", "flush",
                            self.uri], capture_output=True, text=True, timeout=120)
        return p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and i < SIZE // BLOCK:
            ok = self.write(i)
            (self.acked if ok else self.failed)[i] = time.monotonic()
            i += ok             # a refused block is tried again: it is still the next one
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(150)


def check_target(target: Path, writer: Writer) -> None:
    """Every acknowledged write is on the target, which holds a prefix of the writes."""
    data = target.read_bytes()
    present = [i for i in range(len(data) // BLOCK)
               if data[i * BLOCK] == i % 250 + 1 and data[i * BLOCK + BLOCK - 1] == i % 250 + 1]
    assert present == list(range(len(present))), "the target does not hold a prefix"
    missing = [i for i in writer.acked if i not in present]
    TALLY["bytes lost"] += len(missing) * BLOCK
    assert not missing, f"acknowledged writes missing on the promoted target: {missing[:10]}"


def setup_pair(settings, name: str, tmp_path: Path, after: str = "8s",
               lease: str = "5s") -> tuple:
    src = make_image(tmp_path / "src.img", SIZE, data_fraction=0.0)
    spec = create(settings, name, src, tmp_path / "dst.img")
    out = run_x2x("pair", "auto-failover", name, "--after", after, "--lease", lease).stdout
    assert "automatic failover after" in out
    return spec


def start_capture(net: SourceNet, name: str, tmp_path: Path) -> tuple[Proc, str]:
    port = free_port()
    cap = Proc("capture", name, "--nbd", f"127.0.0.1:{port}", "--mode", "flush-sync",
               "--on-fence", f"echo $X2X_PAIR $X2X_REASON >> {tmp_path / 'fenced'}",
               prefix=net.prefix, banner="serving")
    assert "holding a 5 s lease" in cap.banner, cap.banner
    return cap, f"nbd://127.0.0.1:{port}/{name}"


def start_watcher(name: str, tmp_path: Path) -> Proc:
    return Proc("watch", name, "--on-promote",
                f"echo $X2X_PAIR $X2X_EPOCH $X2X_RPO_S >> {tmp_path / 'promoted'}",
                banner="watching")


def logs(watchers: list[Proc]) -> str:
    return "\n".join(f"watcher {i}:\n{w.stderr()}" for i, w in enumerate(watchers))


def stopped(watchers: list[Proc], timeout: float = 60) -> None:
    """Every watcher ends by itself once the pair is promoted."""
    for w in watchers:
        try:
            w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a watcher still runs after the promotion:\n"
                                 f"{logs(watchers)}") from None


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def scenario(settings, name: str, tmp_path: Path, net: SourceNet, watchers: int = 1):
    """A pair with automatic failover, its capturer in the source's namespace, armed
    watchers and a writer; everything stopped at the end."""
    spec = setup_pair(settings, name, tmp_path)
    cap, uri = start_capture(net, name, tmp_path)
    ws = [start_watcher(name, tmp_path) for _ in range(watchers)]
    writer = Writer(net.prefix, uri)
    try:
        for w in ws:
            w.wait_log("watcher armed", timeout=60)
        yield spec, cap, ws, writer
    finally:
        writer.stop()
        for w in ws:
            w.kill()
        cap.kill()


def test_a_source_cut_off_fences_itself_and_one_watcher_promotes(
        settings, pair_name, tmp_path, net):
    with scenario(settings, pair_name, tmp_path, net, watchers=2) as (   # one wins
            spec, cap, watchers, writer):
        time.sleep(3)
        assert len(writer.acked) > 5, writer.failed
        net.cut()
        cut = time.monotonic()
        # The source fences itself within its lease: writes fail from then on.
        cap.wait_log("fenced", timeout=30)
        fenced_at = time.monotonic()
        deadline = time.monotonic() + 60
        while not lines(tmp_path / "promoted") and time.monotonic() < deadline:
            time.sleep(0.2)
        promoted_at = time.monotonic()
        acked_after = [t for t in writer.acked.values() if t > cut]
        print(f"\ncut -> fenced {fenced_at - cut:.1f} s, cut -> promoted "
              f"{promoted_at - cut:.1f} s; {len(writer.acked)} writes acknowledged, "
              f"{len(acked_after)} after the cut, last {max(writer.acked.values()) - cut:+.1f} s")
        assert fenced_at - cut <= 5 + 2 + 1, "the lease did not fence in time"
        assert promoted_at - cut >= 8, "promoted before the failover delay"
        assert all(t <= cut + 5 + 2 for t in writer.acked.values()), \
            "a write was acknowledged after the lease ran out"
        stopped(watchers)
        assert len(lines(tmp_path / "promoted")) == 1, logs(watchers)
        assert lines(tmp_path / "fenced") and pair_name in lines(tmp_path / "fenced")[0]
        st = control.get_pair(settings, pair_name)
        assert st.state == "promoted" and st.promotion.forced
        # The link comes back: the old source stays fenced and refuses writes.
        net.heal()
        time.sleep(2)
        assert not writer.write(SIZE // BLOCK - 1), "the old source took a write after failover"
        writer.stop()
        check_target(Path(spec.target), writer)
        TALLY["automatic failovers"] += 1
    # The way back: the old source becomes the promoted side's target. Its capturer was
    # killed, so its last beat (fenced) says it serves until that beat is FRESH_S old;
    # failback refuses until then (split brain), and an operator waits as long.
    deadline = time.monotonic() + FRESH_S + 10
    while (json.loads(run_x2x("status", pair_name, "--json").stdout)[0]
           ["capture_seen_s_ago"] < FRESH_S and time.monotonic() < deadline):
        time.sleep(0.5)
    out = run_x2x("pair", "failback", pair_name).stdout
    assert "failback done" in out


def test_a_killed_source_is_failed_over_too(settings, pair_name, tmp_path, net):
    with scenario(settings, pair_name, tmp_path, net) as (spec, cap, (watcher,), writer):
        time.sleep(3)
        writer.stop()
        cap.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        stopped([watcher])
        assert time.monotonic() - killed >= 8
        assert len(lines(tmp_path / "promoted")) == 1
        assert control.get_pair(settings, pair_name).state == "promoted"
        check_target(Path(spec.target), writer)
        TALLY["automatic failovers"] += 1


def test_a_watcher_kept_off_the_target_tries_again_and_promotes(
        settings, pair_name, tmp_path, net):
    """A promotion that finds the target held (another watcher's applier, here an
    'x2x apply' service) does not end the watcher: it tries again while the source stays
    lost, and promotes once the target is free."""
    spec = setup_pair(settings, pair_name, tmp_path)
    cap, uri = start_capture(net, pair_name, tmp_path)
    app = Proc("apply", pair_name)
    lock = CheckpointStore(pair_name, spec.target).path.with_suffix(".lock")
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text() == str(app.proc.pid)):
        assert app.proc.poll() is None and time.monotonic() < deadline, app.stderr()
        time.sleep(0.1)
    watcher = start_watcher(pair_name, tmp_path)
    writer = Writer(net.prefix, uri)
    try:
        watcher.wait_log("watcher armed", timeout=60)
        time.sleep(2)
        writer.stop()
        cap.proc.send_signal(signal.SIGKILL)
        watcher.wait_log("did not promote", timeout=60)
        assert not lines(tmp_path / "promoted")
        assert control.get_pair(settings, pair_name).state in ("created", "failing-over")
        app.stop()
        stopped([watcher], timeout=90)
        assert len(lines(tmp_path / "promoted")) == 1, logs([watcher])
        assert control.get_pair(settings, pair_name).state == "promoted"
        check_target(Path(spec.target), writer)
    finally:
        writer.stop()
        for p in (watcher, app, cap):
            p.kill()


def test_a_blip_shorter_than_the_lease_fences_nothing(settings, pair_name, tmp_path, net):
    with scenario(settings, pair_name, tmp_path, net) as (spec, cap, (watcher,), writer):
        time.sleep(1)
        # Status shows the watcher, the source's lease and the time to failover.
        out = run_x2x("status", pair_name).stdout
        assert "automatic failover" in out and "5 s held" in out and "armed" in out, out
        (row,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
        a = row["auto_failover"]
        assert a["after_ms"] == 8000 and a["source_lease_ms"] == 5000
        assert a["watchers"][0]["state"] == "armed"
        assert float(a["watchers"][0]["failover_in_s"]) > 4
        net.cut()
        time.sleep(2)
        net.heal()
        healed = time.monotonic()
        time.sleep(10)              # past the failover delay counted from the cut
        assert any(t > healed for t in writer.acked.values()), writer.failed
        assert not lines(tmp_path / "fenced") and not lines(tmp_path / "promoted")
        assert "fenced" not in cap.stderr()
        assert control.get_pair(settings, pair_name).state == "created"
        assert watcher.proc.poll() is None
        # Turned off while capturing: the running capturer drops its lease at once, so a
        # cut longer than the lease no longer fences it (the watcher only applies).
        off_ms = now_ms()
        run_x2x("pair", "auto-failover", pair_name, "--off")
        cap.wait_log("automatic failover off", timeout=30)
        deadline = time.monotonic() + 30
        while True:         # its beats say so
            b = newest(read_beats(settings), pair_name, "capturer", spec.source)
            if b.at_ms > off_ms and "lease_ms" not in b.detail:
                break
            assert time.monotonic() < deadline, "the capturer still holds a lease"
            time.sleep(0.5)
        net.cut()
        time.sleep(7)
        net.heal()
        healed = time.monotonic()
        deadline = time.monotonic() + 60
        while not any(t > healed for t in writer.acked.values()):
            assert time.monotonic() < deadline, writer.failed
            time.sleep(0.5)
        assert "fenced" not in cap.stderr()
    run_x2x("apply", pair_name, "--until-caught-up")
    check_target(Path(spec.target), writer)


def test_a_watcher_cut_off_from_the_broker_is_blind_and_promotes_nothing(
        settings, pair_name, tmp_path, net):
    """The watcher, not the source, loses the broker, for longer than the failover delay,
    while the source is idle (heartbeats only, no journal progress). The watcher keeps
    its reads of the broker open across polls: what they held before the cut must not
    pass for the broker's silence. It is blind, says so and promotes nothing; back on
    the network it sees the source alive and stays armed."""
    spec = setup_pair(settings, pair_name, tmp_path)
    port = free_port()
    cap = Proc("capture", pair_name, "--nbd", f"127.0.0.1:{port}", "--mode", "flush-sync",
               "--on-fence", f"echo $X2X_PAIR >> {tmp_path / 'fenced'}", banner="serving")
    watcher = Proc("watch", pair_name, "--on-promote",
                   f"echo $X2X_PAIR >> {tmp_path / 'promoted'}", banner="watching",
                   prefix=net.prefix)
    writer = Writer((), f"nbd://127.0.0.1:{port}/{pair_name}")
    try:
        watcher.wait_log("watcher armed", timeout=60)
        time.sleep(2)
        writer.stop()                   # an idle source from here on
        net.cut()
        watcher.wait_log("cannot read the broker", timeout=40)
        time.sleep(8 + 4)               # past the failover delay, still cut off
        net.heal()
        healed = time.monotonic()
        while _watcher_state(pair_name) != "armed":     # ("not-armed" is not)
            assert time.monotonic() - healed < 60, logs([watcher])
            time.sleep(0.5)
        time.sleep(8 + 2)               # a failover delay on the network again
        assert watcher.proc.poll() is None, logs([watcher])
        assert not lines(tmp_path / "promoted") and "promoting" not in watcher.stderr()
        # Blind for ~15 s at a poll every 0.5 s: said when it began (and when what is
        # wrong changed), not at every poll; and said when it ended.
        blind = watcher.stderr().count("cannot read the broker")
        assert 1 <= blind <= 4, logs([watcher])
        assert "reading the broker again" in watcher.stderr(), logs([watcher])
        assert control.get_pair(settings, pair_name).state == "created"
        nxt = max(writer.acked) + 1
        assert writer.write(nxt), "the source no longer takes writes"
        writer.acked[nxt] = time.monotonic()
        assert not lines(tmp_path / "fenced")
    finally:
        writer.stop()
        watcher.kill()
        cap.kill()
    run_x2x("apply", pair_name, "--until-caught-up")
    check_target(Path(spec.target), writer)


_TAIL = """
import sys
from infra.heartbeat import BeatTail
from infra.kafka import KafkaSettings
from journal.errors import BrokerError
tail = BeatTail(KafkaSettings.resolve(), timeout=4)
print(len(tail.latest(fresh=True)), flush=True)
sys.stdin.readline()                                   # the link is cut now
print(len(tail.latest()), flush=True)
try:
    tail.latest(fresh=True)
    print("fresh: answered", flush=True)
except BrokerError as e:
    print(f"fresh: {e}", flush=True)
"""


def test_a_fresh_beat_tail_cut_off_from_the_broker_answers_nothing(settings, net):
    """What the watcher's heartbeat reads rest on: cut off, a tail still answers from
    what it holds, but asked for a fresh answer it raises BrokerError."""
    from confluent_kafka import Producer
    from infra.heartbeat import HeartbeatPublisher
    from infra.topics import ensure_base_topics
    ensure_base_topics(settings.check_reachable())
    producer = Producer(settings.side_producer())
    HeartbeatPublisher(producer, "tail-cut", "capturer", "x").beat("capturing", 1, 1, 0, 0)
    assert producer.flush(10) == 0
    proc = subprocess.Popen([*net.prefix, sys.executable, "-c", _TAIL],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        held = int(proc.stdout.readline())
        assert held >= 1
        net.cut()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert int(proc.stdout.readline()) == held
        line = proc.stdout.readline()
        assert line.startswith("fresh: no answer from Kafka about the offsets of "
                               "x2x.status"), line
        assert "is the broker up?" in line
    finally:
        net.heal()
        proc.kill()
        proc.wait(10)


def _watcher_state(pair: str) -> str:
    """The state the pair's watcher last announced in a heartbeat seen in the last 3 s."""
    (row,) = json.loads(run_x2x("status", pair, "--json").stdout)
    fresh = [w for w in row["auto_failover"]["watchers"] if w["seen_s_ago"] < 3]
    return fresh[0]["state"] if fresh else ""


def test_a_lease_too_long_for_the_failover_delay_is_refused(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", SIZE, data_fraction=0.0)
    create(settings, pair_name, src, tmp_path / "dst.img")
    proc = run_x2x("pair", "auto-failover", pair_name, "--after", "10s", "--lease", "9s",
                   check=False)
    assert proc.returncode == 2 and "must end at least 2 s before the failover" in \
        proc.stderr, proc.stderr
    proc = run_x2x("pair", "auto-failover", pair_name, "--lease", "5s", check=False)
    assert proc.returncode == 2 and "--after" in proc.stderr
    assert control.get_pair(settings, pair_name).auto is None
    run_x2x("pair", "auto-failover", pair_name, "--after", "10s")
    assert control.get_pair(settings, pair_name).auto.lease_ms == 8000
    run_x2x("pair", "auto-failover", pair_name, "--off")
    assert control.get_pair(settings, pair_name).auto is None
