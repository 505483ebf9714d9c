"""Consistency groups on a real broker: the group capture service, group cuts, appliers
that checkpoint only at committed cuts, a forced group failover at one cut, and the bad
inputs (journal/groups.py, DESIGN rule 19)."""
from __future__ import annotations

import contextlib
import os
import signal
import struct
import threading
import time
from pathlib import Path

from consumers.applier import Applier
from consumers.checkpoint import CheckpointStore
from infra import control
from journal.errors import Busy
from nbd.client import Client, parse_uri
from tests.conftest import free_port, run_x2x
from tests.e2e.test_failover import new_pair, service

MiB = 1 << 20
SIZE = 128 * MiB
BLOCK = 4096
#: Writes that fit the disks without writing a block twice.
LAST = 2 * SIZE // BLOCK - 2


def _pairs(settings, base: str, tmp_path: Path, n: int = 2) -> list:
    specs = []
    for i in range(n):
        d = tmp_path / f"disk{i}"
        d.mkdir()
        specs.append(new_pair(settings, f"{base}-{i}", d, SIZE))
    return specs


def _group(settings, name: str, specs) -> None:
    run_x2x("group", "create", name, *[a for s in specs for a in ("--pair", s.name)])


def _stamps(path: str, count: int) -> set[int]:
    """The write numbers a volume holds: block k holds its number (0: never written)."""
    found = set()
    with open(path, "rb") as f:
        data = f.read(count * BLOCK)
    for k in range(0, len(data), BLOCK):
        (n,) = struct.unpack_from("<Q", data, k)
        if n:
            found.add(n)
    return found


def _ordered_writes(uris: list[str], stop: threading.Event, done: list[int]) -> None:
    """Write 1, 2, 3... alternating over the disks, each issued only after the one
    before it completed: a cut holding write n must hold every write before it."""
    clients = [Client.open(parse_uri(u)) for u in uris]
    n = 0
    try:
        while not stop.is_set() and n < LAST:
            n += 1
            c = clients[n % len(clients)]
            block = n // len(clients)
            c.pwrite(block * BLOCK, struct.pack("<Q", n).ljust(BLOCK, b"\0"))
            done[0] = n
    except Exception:       # noqa: BLE001 - the capture service is killed under it
        pass


def test_group_rules_refuse_bad_input(settings, pair_name, tmp_path):
    a, b, c = _pairs(settings, pair_name, tmp_path, 3)
    g = f"{pair_name}-g"
    r = run_x2x("group", "create", g, "--pair", a.name, "--pair", "no-such-pair", check=False)
    assert r.returncode != 0 and "no pair named 'no-such-pair'" in r.stderr
    r = run_x2x("group", "create", g, "--pair", a.name, "--pair", a.name, check=False)
    assert r.returncode != 0 and "named twice" in r.stderr
    r = run_x2x("group", "create", "bad/name", "--pair", a.name, check=False)
    assert r.returncode != 0 and "group name 'bad/name' is invalid" in r.stderr
    assert not control.get_pair(settings, a.name).group       # nothing half applied
    _group(settings, g, [a, b])
    # A pair in two groups.
    r = run_x2x("group", "create", f"{g}2", "--pair", b.name, "--pair", c.name, check=False)
    assert r.returncode != 0 and f"pair {b.name} belongs to group {g} already" in r.stderr
    assert not control.get_pair(settings, c.name).group
    # Pairs replicating in different directions: c is failed over, a and b are not.
    run_x2x("capture", c.name, "--once")
    run_x2x("pair", "failover", c.name)
    r = run_x2x("group", "create", g, "--pair", c.name, check=False)
    assert r.returncode != 0 and "same direction" in r.stderr, r.stderr
    assert "failed over" in r.stderr
    # A grouped pair is not captured alone.
    r = run_x2x("capture", a.name, "--once", check=False)
    assert r.returncode != 0 and f"x2x group capture {g}" in r.stderr
    # Nor failed over, cut over or set to fail over automatically alone.
    for args in (["pair", "failover", a.name, "--force"], ["cutover", a.name, "--no-boot"],
                 ["pair", "auto-failover", a.name, "--after", "30s"]):
        r = run_x2x(*args, check=False)
        assert r.returncode != 0 and f"x2x group failover {g}" in r.stderr, (args, r.stderr)
    assert control.get_pair(settings, a.name).state == "created"
    assert control.get_pair(settings, a.name).auto is None
    out = run_x2x("group", "list").stdout
    assert f"{g}: {a.name}, {b.name}" in out


def test_group_cut_holds_every_write_before_it_after_the_source_dies(
        settings, pair_name, tmp_path):
    """Writes alternate between two disks, each issued after the last completed; the
    capture service is killed mid-stream; after a forced group failover the targets hold
    exactly writes 1..n for some n: never a write without one before it."""
    specs = _pairs(settings, pair_name, tmp_path)
    g = f"{pair_name}-g"
    _group(settings, g, specs)
    port = free_port()
    appliers = [threading.Event() for _ in specs]
    stats: list = []

    def follow(spec, stop):
        stats.append(Applier(spec, spec.target, settings).run(stop=stop))

    threads = [threading.Thread(target=follow, args=(s, e)) for s, e in zip(specs, appliers)]
    with service(["group", "capture", g, "--nbd", f"127.0.0.1:{port}", "--cut-interval",
                  "0.2"], tmp_path / "cap.log", "serving") as proc:
        for t in threads:
            t.start()
        _wait_for(lambda: _beat_says(settings, specs, "capturing"), 60,
                  "the baselines to finish")
        _wait_for(lambda: all(CheckpointStore(s.name, s.target).load() for s in specs), 60,
                  "both targets at a committed group cut")
        try:
            # Removing a pair while the group replicates is refused.
            r = run_x2x("group", "remove", g, "--pair", specs[0].name, check=False)
            assert r.returncode != 0 and "replicates in group" in r.stderr
            status = run_x2x("group", "status", g).stdout
            assert "group RPO" in status, status
            stop, done = threading.Event(), [0]
            writer = threading.Thread(target=_ordered_writes, args=(
                [f"nbd://127.0.0.1:{port}/{s.name}" for s in specs], stop, done))
            writer.start()
            _wait_for(lambda: done[0] > 1000, 60, "1000 ordered writes", 0.01)
            # Several cuts into the stream, and past the async hold (2 s) that keeps a
            # burst on the source while clients write.
            time.sleep(4.0)
            os.kill(proc.pid, signal.SIGKILL)           # the source server dies mid-stream
            proc.wait(10)
            stop.set()
            writer.join(30)
            assert done[0] < LAST, "the writes ended before the kill: nothing was cut short"
            # A forced group failover with an applier still holding a target is refused
            # before anything is promoted.
            r = run_x2x("group", "failover", g, "--force", check=False)
            assert r.returncode != 0 and "stop the appliers of every member" in r.stderr
            assert all(control.get_pair(settings, s.name).state == "created" for s in specs)
        finally:
            for e in appliers:
                e.set()
            for t in threads:
                t.join(60)
    out = run_x2x("group", "failover", g, "--force").stdout
    assert "promoted (forced) at group cut" in out, out
    held = _stamps(specs[0].target, SIZE // BLOCK) | _stamps(specs[1].target, SIZE // BLOCK)
    n = max(held, default=0)
    assert held == set(range(1, n + 1)), (
        f"the targets hold writes up to {n} but miss {sorted(set(range(1, n + 1)) - held)[:10]}")
    assert n >= 300, f"only {n} of {done[0]} writes reached the group's targets"
    print(f"\n{done[0]} ordered writes before the kill; the group cut holds 1..{n}")
    for s in specs:
        assert control.get_pair(settings, s.name).state == "promoted"
    # A replica of the whole group at one point in time: the same prefix of the writes.
    out = run_x2x("group", "replica", g, "--target-dir", str(tmp_path / "pit"), "--at",
                  "now").stdout
    assert "at group cut" in out, out
    pit = set()
    for s in specs:
        pit |= _stamps(str(tmp_path / "pit" / f"{s.name}.img"), SIZE // BLOCK)
    m = max(pit, default=0)
    assert pit == set(range(1, m + 1)) and m >= n, (m, n)


def _held(target: str, pair: str) -> bool:
    """Does an applier hold ``target`` (its checkpoint's lock)?"""
    try:
        with CheckpointStore(pair, target).lock():
            return False
    except Busy:
        return True


def _beat_says(settings, specs, state: str) -> bool:
    from infra.heartbeat import read_beats
    from journal.status import newest
    beats = read_beats(settings)
    found = [newest(beats, s.name, "capturer") for s in specs]
    return all(b is not None and b.state == state and b.detail.get("group_cut", "0") != "0"
               for b in found)


def _wait_for(check, timeout: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _write_blocks(uris: list[str], seed: int, count: int = 64) -> None:
    for i, u in enumerate(uris):
        with Client.open(parse_uri(u)) as c:
            for k in range(count):
                c.pwrite((k * 7 + seed) % (SIZE // BLOCK) * BLOCK,
                         bytes([seed + i + 1]) * BLOCK)
            c.flush()


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_planned_group_failover_then_failback_and_verify(settings, pair_name, tmp_path):
    """Planned: the group's service seals every disk and exits; every target is promoted
    with its digest verified. The promoted side is served as the group, the old sources
    follow it again (failback), and a group verify finds nothing differing."""
    specs = _pairs(settings, pair_name, tmp_path)
    g = f"{pair_name}-g"
    _group(settings, g, specs)
    port = free_port()
    uris = [f"nbd://127.0.0.1:{port}/{s.name}" for s in specs]
    with service(["group", "capture", g, "--nbd", f"127.0.0.1:{port}"],
                 tmp_path / "cap-a.log", "serving") as proc:
        _wait_for(lambda: _beat_says(settings, specs, "capturing"), 60, "the baselines")
        _write_blocks(uris, seed=1)
        out = run_x2x("group", "failover", g).stdout
        assert "promoted (planned)" in out, out
        proc.wait(60)
        assert "stopped (clean)" in (tmp_path / "cap-a.log").read_text()
    for s in specs:
        st = control.get_pair(settings, s.name)
        assert st.state == "promoted" and st.reversed
        assert _same(s.source, s.target)
    # The promoted side served on a unix socket, one export per pair as over TCP.
    sock = tmp_path / "group.sock"
    uris = [f"nbd+unix:///{s.name}?socket={sock}" for s in specs]
    with service(["group", "capture", g, "--nbd", str(sock)],
                 tmp_path / "cap-b.log", "serving"):
        _write_blocks(uris, seed=5)
        out = run_x2x("group", "failback", g).stdout
        assert out.count("the old source follows") == 2, out
        for s in specs:
            assert control.get_pair(settings, s.name).state == "replicating"
        # With the members' appliers running as services (checkpointing at group cuts),
        # each answers the verify at the HASHES' own point.
        with contextlib.ExitStack() as appliers:
            for s in specs:
                appliers.enter_context(service(["apply", s.name],
                                               tmp_path / f"apply-{s.name}.log", ""))
            _wait_for(lambda: all(_held(s.source, s.name) for s in specs), 60,
                      "the appliers to hold their targets")
            _write_blocks(uris, seed=9)
            r = run_x2x("group", "verify", g)
        assert r.stdout.count(", 0 differ") == 2, r.stdout
        assert r.stderr.count("waiting for its comparison") == 2, r.stderr
