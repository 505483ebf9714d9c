"""Thin links (issue #18), over an emulated WAN: the source's capturer in a network
namespace of its own (tests/net.py) whose uplink is shaped to 10 Mbit/s by ``tc ... tbf``,
through a forwarder that adds 20 ms each way and the cost of 0.5 % segment loss, and
counts the bytes the source sends.

The pair's ``--max-rate`` is 8 Mbit/s (below the link, so the limit is what binds). An
async client writes 32 MiB of random data (incompressible: Kafka's lz4 does not shrink
what the limit counted) beside a small writer that writes and flushes one pattern block
every ~0.1 s, whose acknowledgement times give the RPO as a client sees it.

Printed figures: the client's local write speed, the rate measured on the wire and by
the capturer, the ETA status gave against the real time, the RPO status gave against the
one read off the target, and for the cut link the bytes sent to catch up.

The link cut lasts 20 s (the issue says ~60 s; 20 s keeps the test short and is still
twice the capturer's stall limit, X2X_JOURNAL_STALL = 10 s, so it goes degraded)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from infra.heartbeat import read_local_beats
from infra.retention import watermarks
from journal.linkstate import link_state
from journal.clock import now_ms
from tests.conftest import free_port, make_image, run_x2x
from tests.faults.conftest import TALLY, Proc, bytes_differing, need
from tests.faults.test_auto_failover import BLOCK, Writer
from tests.integration.test_replication import create
from tests.net import SourceNet

MiB = 1 << 20
SIZE = 64 * MiB
BULK_AT, BULK = 32 * MiB, 32 * MiB
MAX_RATE, MAX_RATE_BPS = "8Mbit", 1_000_000


@pytest.fixture
def wan(broker, tmp_path):
    need("qemu-io")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    n = SourceNet(int(broker.bootstrap.rsplit(":", 1)[1]), delay_ms=20, loss=0.005,
                  count=tmp_path / "sent")
    n.shape("10mbit")
    yield n
    n.close()


def status(name: str) -> tuple[float, dict]:
    """(monotonic time of the read, the pair's row of ``x2x status --json``)."""
    (row,) = json.loads(run_x2x("status", name, "--json").stdout)
    return time.monotonic(), row


def link_of(row: dict) -> dict:
    return row["link"]


def wait_link(name: str, state: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, row = status(name)
        if link_of(row)["state"] == state:
            return row
        time.sleep(1)
    raise AssertionError(f"the link of {name} never became {state}: {link_of(row)}")


def newest_present(target: Path, writer: Writer) -> int:
    """The newest of the writer's blocks on the target with every one before it (-1:
    none): the target is the source as of that write."""
    with open(target, "rb") as f:
        data = f.read(len(writer.acked) * BLOCK + BLOCK)
    i = -1
    while (i + 1) * BLOCK < len(data) and data[(i + 1) * BLOCK] == (i + 1) % 250 + 1 \
            and data[(i + 2) * BLOCK - 1] == (i + 1) % 250 + 1:
        i += 1
    return i


class Setup:
    def __init__(self, settings, name: str, tmp_path: Path, wan: SourceNet,
                 limited: bool = True) -> None:
        self.name = name
        src = make_image(tmp_path / "src.img", SIZE, data_fraction=0.0)
        self.spec = create(settings, name, src, tmp_path / "dst.img")
        if limited:
            out = run_x2x("pair", "rate", name, "--max-rate", MAX_RATE).stdout
            assert "link 8 Mbit/s" in out, out
        port = free_port()
        self.cap = Proc("--verbose", "capture", name, "--nbd", f"127.0.0.1:{port}", "--mode", "async",
                        prefix=wan.prefix, banner="serving")
        self.uri = f"nbd://127.0.0.1:{port}/{name}"
        self.app = Proc("apply", name)
        self.writer: Writer | None = None
        wait_link(name, "continuous", 120)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        self.app.kill()
        self.cap.kill()


def write_bulk(s: Setup, wan: SourceNet, tmp_path: Path) -> None:
    """An async client writes BULK random bytes at BULK_AT in one go, then flushes."""
    bulk = tmp_path / "bulk"
    bulk.write_bytes(os.urandom(BULK))
    subprocess.run([*wan.prefix, "qemu-io", "-f", "raw", "-c",
                    f"write -s {bulk} {BULK_AT} {BULK}", "-c", "flush", s.uri],
                   check=True, capture_output=True, timeout=120)


@pytest.fixture
def thin(settings, pair_name, tmp_path, wan):
    """A pair limited to 8 Mbit/s, caught up, a small writer running for 3 s."""
    s = Setup(settings, pair_name, tmp_path, wan)
    try:
        s.writer = Writer(wan.prefix, s.uri)
        time.sleep(3)
        yield s
    finally:
        s.close()


def test_a_thin_link_holds_its_rate_while_async_clients_write_at_local_speed(
        pair_name, tmp_path, wan, thin):
    s, writer = thin, thin.writer
    t0 = time.monotonic()
    write_bulk(s, wan, tmp_path)
    local_s = time.monotonic() - t0
    wire_s = BULK / MAX_RATE_BPS
    print(f"\n32 MiB written by an async client in {local_s:.1f} s "
          f"({BULK / MiB / local_s:.0f} MiB/s); the link needs {wire_s:.0f} s")
    assert local_s < wire_s / 4, "the client waited for the link"

    # Status every second until caught up: ETA, rates, RPO (reported and measured).
    samples, rpos = [], []
    deadline = time.monotonic() + 3 * wire_s
    while time.monotonic() < deadline:
        t, row = status(pair_name)
        link = link_of(row)
        sent = wan.sent()
        (rep,) = row["replicas"]
        if rep["rpo_s"] is not None and t - t0 > 4:
            k = newest_present(Path(s.spec.target), writer)
            if 0 <= k < len(writer.acked) - 1:
                rpos.append((rep["rpo_s"], time.monotonic() - writer.acked[k],
                             rep["seen_s_ago"]))
        at = t - row["capture_seen_s_ago"]      # when the capturer said it
        samples.append((t, at, link, sent))
        if (link["behind_bytes"] or 0) < 256 << 10 and t - t0 > 5:
            break       # caught up: what is behind is the small writer's latest
        time.sleep(1)
    states = [x[2]["state"] for x in samples]
    assert states[-1] == "continuous", states
    assert "backlog" in states, states
    done_at = samples[-1][1]

    # The ETA: the first backlog sample once the clients' burst is over (the
    # write rate of its beat is the small writer's only), against when it ended.
    eta_t, eta = next((at, x["eta_s"]) for t, at, x, _ in samples
                      if x["state"] == "backlog" and x["eta_s"] and t - t0 > 6)
    real = done_at - eta_t
    # Figures, printed for the issue (1-14 % off in 8 quiet runs); a loaded machine
    # moves them, so only what load cannot break is asserted (timings belong in bench/).
    print(f"ETA said {eta:.1f} s, caught up in {real:.1f} s "
          f"({100 * (eta - real) / real:+.0f} %)")
    assert eta > 0

    # The rate: bytes on the wire while the backlog drained at the limit.
    steady = [(t, sent) for t, _, x, sent in samples
              if x["state"] == "backlog" and t - t0 > 3]
    (ta, a), (tb, b) = steady[0], steady[-1]
    wire_bps = (b - a) / (tb - ta)
    told = [x["send_bps"] for _, _, x, _ in samples if x["state"] == "backlog"]
    print(f"on the wire {wire_bps * 8 / 1e6:.2f} Mbit/s over {tb - ta:.0f} s, capturer "
          f"says {sum(told) / len(told) * 8 / 1e6:.2f} Mbit/s; --max-rate {MAX_RATE}")
    # The limit holds: load can only make the wire slower, never faster than the limit.
    assert wire_bps <= 1.1 * MAX_RATE_BPS, wire_bps

    # The RPO status reported against the one the target shows. Status says what
    # the target held at the applier's last beat (0.25 s after a checkpoint), aged to now; the
    # target read a moment later can only be fresher, by whatever was applied since
    # that beat (at the end of the backlog, seconds of writes at once): status may
    # overstate the RPO for up to one applier beat, never understate it.
    diffs = sorted(abs(r - m) for r, m, _ in rpos)
    top = max(rpos, key=lambda x: x[1])
    print(f"RPO: {len(rpos)} readings, up to {top[1]:.1f} s measured ({top[0]:.1f} s "
          f"reported); difference median {diffs[len(diffs) // 2]:.1f} s, largest "
          f"{diffs[-1]:.1f} s; (reported, measured, applier beat age): "
          + ", ".join(f"({r:.1f}, {m:.1f}, {a:.1f})" for r, m, a in rpos))
    assert len(rpos) >= 5 and top[1] > 10, rpos
    assert all(r >= m - 1.5 for r, m, _ in rpos), "status understated the RPO"
    writer.stop()
    s.writer = None
    run_x2x("status", pair_name)            # the table renders the link column
    wait_caught_up(pair_name)
    assert bytes_differing(s.spec.source, s.spec.target) == 0
    TALLY["thin links"] += 1


def test_without_a_limit_a_backlog_crosses_a_thin_link_without_degrading(
        settings, pair_name, tmp_path, wan):
    """No --max-rate: the link alone paces the journal. A backlog that takes longer than
    the stall limit (10 s) to cross it is slow, not dead: the broker keeps acknowledging,
    so the capturer must not take it for an outage (and resend it again and again)."""
    s = Setup(settings, pair_name, tmp_path, wan, limited=False)
    try:
        t0 = time.monotonic()
        write_bulk(s, wan, tmp_path)
        deadline = time.monotonic() + 240
        while bytes_differing(s.spec.source, s.spec.target):
            assert time.monotonic() < deadline, "the backlog never reached the target"
            time.sleep(2)
        print(f"\n{BULK // MiB} MiB crossed the 10 Mbit/s link unlimited in "
              f"{time.monotonic() - t0:.1f} s")
        assert "degraded" not in s.cap.stderr(), s.cap.stderr()[-2000:]
        TALLY["thin links"] += 1
    finally:
        s.close()


def wait_caught_up(name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, row = status(name)
        if link_of(row)["state"] == "continuous" and all(
                r["lag_ops"] == 0 for r in row["replicas"]):
            return
        time.sleep(1)
    raise AssertionError(f"{name} did not catch up: {row}")


def test_a_cut_link_degrades_the_pair_and_it_catches_up_without_a_full_copy(
        pair_name, wan, thin):
    s, writer = thin, thin.writer
    wan.cut()
    cut = time.monotonic()
    seen, local = set(), set()
    while time.monotonic() - cut < 20:
        _, row = status(pair_name)
        seen.add(link_of(row)["state"])
        for b in read_local_beats():       # what the source itself says
            if b.pair == pair_name:
                local.add(link_state(b, now_ms()).state)
        time.sleep(1)
    acked_during = [t for t in writer.acked.values() if t > cut]
    wan.heal()
    healed, sent = time.monotonic(), wan.sent()
    print(f"\nduring a 20 s cut: broker side saw {sorted(seen)}, the source "
          f"{sorted(local)}; {len(acked_during)} async writes acknowledged")
    assert "stalled" in seen and "degraded" in local
    assert len(acked_during) > 20, "async writes did not go on during the cut"
    s.cap.wait_log("resends the marked extents", timeout=60)
    writer.stop()
    s.writer = None
    wait_caught_up(pair_name)
    wire = wan.sent() - sent
    m = re.search(r"resent (\d+) bytes in (\d+) extents", s.cap.wait_log(" extents in ", 60))
    resent = int(m.group(1))
    print(f"caught up {time.monotonic() - healed:.1f} s after the link came back: "
          f"{resent / MiB:.2f} MiB resent in {m.group(2)} extents, {wire / MiB:.2f} MiB "
          f"on the wire (the volume: {SIZE // MiB} MiB)")
    assert 0 < resent < SIZE / 16, "a full copy"
    assert "baseline of pair" not in s.cap.stderr().split("resends the marked")[1]
    assert bytes_differing(s.spec.source, s.spec.target) == 0
    TALLY["thin links"] += 1


@pytest.mark.parametrize("args,says", [
    (("--max-rate", "20mb"), "--max-rate '20mb' is ambiguous ('mb'): write 20Mbit"),
    (("--max-rate", "fast"), "--max-rate 'fast' is not a rate"),
    (("--rate-schedule", "Mon-Fri 08:00-18:00"), "has no '=RATE'"),
    (("--rate-schedule", "Mon-Fry 08:00-18:00=1Mbit"), "'Mon-Fry' is not a day"),
    (("--rate-schedule", "Mon 08:00-25:00=1Mbit"), "'25:00' is not a time of day")])
def test_a_malformed_rate_or_schedule_is_refused_before_anything_is_published(args, says):
    proc = run_x2x("pair", "rate", "no-such-pair", *args, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_a_malformed_compression_is_refused():
    proc = run_x2x("--compression", "zstd:99", "pair", "list", check=False)
    assert proc.returncode == 2 and "level '99' is not in" in proc.stderr, proc.stderr
    proc = run_x2x("--compression", "brotli", "pair", "list", check=False)
    assert proc.returncode == 2 and "unknown codec 'brotli'" in proc.stderr, proc.stderr


def test_a_scan_capture_obeys_the_pair_rate(settings, pair_name, tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB, data_fraction=1.0)
    create(settings, pair_name, src, tmp_path / "dst.img")
    run_x2x("pair", "rate", pair_name, "--max-rate", MAX_RATE)
    t0 = time.monotonic()
    out = json.loads(run_x2x("capture", pair_name, "--once", "--json").stdout)
    took = time.monotonic() - t0
    print(f"\nscan: {out['bytes_sent'] / MiB:.1f} MiB in {out['seconds']:.1f} s "
          f"({out['bytes_sent'] / out['seconds'] * 8 / 1e6:.2f} Mbit/s), {took:.1f} s in all")
    # At most the rate; below it only by the run's fixed costs (producer start, the
    # drain, state saves, the baseline's control event), which ``seconds`` includes.
    rate = out["bytes_sent"] / out["seconds"]
    assert 0.6 * MAX_RATE_BPS <= rate <= 1.15 * MAX_RATE_BPS, rate


def test_a_running_capturer_follows_a_rate_change_at_once(settings, pair_name, tmp_path):
    need("qemu-io")
    src = make_image(tmp_path / "src.img", 4 * MiB, data_fraction=0.0)
    create(settings, pair_name, src, tmp_path / "dst.img")
    port = free_port()
    cap = Proc("capture", pair_name, "--nbd", f"127.0.0.1:{port}", "--mode", "async",
               banner="serving")
    try:
        wait_link(pair_name, "continuous", 60)
        for args, state, limit in [(("--max-rate", "2Mbit"), "continuous", "2 Mbit/s"),
                                   (("--rate-schedule", "*=pause"), "paused", "paused"),
                                   ((), "continuous", "unlimited")]:
            t0 = time.monotonic()
            run_x2x("pair", "rate", pair_name, *args)
            deadline = time.monotonic() + 15
            while (link := link_of(status(pair_name)[1]))["limit"] != limit:
                assert time.monotonic() < deadline, link
                time.sleep(0.5)
            assert link["state"] == state, link
            print(f"\n{' '.join(args) or 'unlimited'}: status showed it after "
                  f"{time.monotonic() - t0:.1f} s")
        show = run_x2x("pair", "show", pair_name, "--json").stdout
        assert json.loads(show)["link"] == "unlimited"
    finally:
        cap.kill()


def test_a_resync_without_a_live_capturer_obeys_the_pair_rate(settings, pair_name, tmp_path):
    from producers.scan import scan_once
    src = make_image(tmp_path / "src.img", 16 * MiB, data_fraction=1.0)
    spec = create(settings, pair_name, src, tmp_path / "dst.img")
    scan_once(spec, settings)
    run_x2x("apply", pair_name, "--until-caught-up")
    took = {}
    for at, rate in ((2 * MiB, None), (8 * MiB, MAX_RATE)):
        if rate:
            run_x2x("pair", "rate", pair_name, "--max-rate", rate)
        with open(src, "r+b") as f:
            f.seek(at)
            f.write(os.urandom(4 * MiB))
        t0 = time.monotonic()
        r = json.loads(run_x2x("pair", "resync", pair_name, "--json").stdout)
        took[rate] = time.monotonic() - t0
        assert r["resent_bytes"] == 4 * MiB, r
    alone = 4 * MiB / MAX_RATE_BPS
    print(f"\nresync of 4 MiB: {took[None]:.1f} s unlimited, {took[MAX_RATE]:.1f} s at "
          f"{MAX_RATE} (the limit alone: {alone:.1f} s)")
    # The bucket lets one record plus a quarter second through at once (producers/rate.py),
    # so the limit alone accounts for 4 MiB less up to about 1.3 MB; a loaded machine only
    # makes either run slower, so the limited run is bounded below, and it must also show
    # the limit beside the unlimited run's own cost.
    assert took[MAX_RATE] >= 0.65 * alone, took
    assert took[MAX_RATE] - took[None] >= 0.4 * alone, took
    assert bytes_differing(src, spec.target) == 0


#: Where the paced writes go: every 13th 4 KiB block, wrapping at the volume's end.
PACED_STEP = 4096 * 13


def paced_writes(uri: str, count: int, gap: float, size: int, pattern: int) -> float:
    """Send ``count`` 4 KiB WRITEs one every ``gap`` seconds without waiting for their
    replies (a client at depth whose requests come spread out, as they do behind a
    busy guest), then FLUSH; returns the seconds it took. Every reply must be OK."""
    from nbd import proto
    from nbd.client import Client, parse_uri
    c = Client.open(parse_uri(uri))
    sock = c._sock      # the transmission phase's socket: requests pipelined here
    errors: list[int] = []

    def replies() -> None:
        for _ in range(count):
            errors.append(proto.parse_simple_reply(
                sock.recv(proto.SIMPLE_REPLY_SIZE, socket.MSG_WAITALL)).error)

    reader = threading.Thread(target=replies)
    reader.start()
    t0 = time.monotonic()
    data = bytes([pattern]) * 4096
    for i in range(count):
        sock.sendall(proto.encode_request(proto.Request(
            0, proto.Cmd.WRITE, i + 1, i * PACED_STEP % size, 4096)) + data)
        time.sleep(gap)
    reader.join(60)
    c.flush()
    took = time.monotonic() - t0
    c.close()
    assert errors == [0] * count, errors
    return took


def test_sync_writes_over_a_slow_link_share_records(settings, pair_name, tmp_path, broker):
    """Group commit: while one record is in flight (20 ms over this link) the sync
    writes that come meanwhile wait for the next one together, rather than each going
    out as a record of its own (one signature, one report, one applier step each)."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    net = SourceNet(int(broker.bootstrap.rsplit(":", 1)[1]), delay_ms=10)
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, data_fraction=0.0)
    create(settings, pair_name, src, tmp_path / "dst.img")
    port = free_port()
    cap = Proc("capture", pair_name, "--nbd", f"{net.ns_ip}:{port}", "--mode", "sync",
               prefix=net.prefix, banner="serving")
    writes = 200
    try:
        wait_link(pair_name, "continuous", 60)
        before = watermarks(settings, pair_name)[1]
        took = paced_writes(f"nbd://{net.ns_ip}:{port}/{pair_name}", writes, 0.001, size,
                            0x5A)
        records = watermarks(settings, pair_name)[1] - before
    finally:
        cap.kill()
        net.close()
    print(f"\n{writes} sync writes, one every ms, over a 20 ms round trip: {records} "
          f"records in {took:.2f} s")
    # One in flight at a time: ~20 writes a record (15 records measured); with no
    # bound, 88.
    assert 0 < records <= writes // 6, records
    with open(src, "rb") as f:     # every write acknowledged is on the source
        data = f.read()
    for i in range(writes):
        at = i * PACED_STEP % size
        assert data[at:at + 4096] == b"\x5a" * 4096, i
