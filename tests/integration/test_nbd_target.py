"""The applier on an NBD target, watched from the server side (x2x's own NBD core with a
recording backend): a checkpoint is written only after a FLUSH the server acknowledged,
with no write after it; zeroed ranges arrive as WRITE_ZEROES, never as written zeros."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time

from consumers.applier import Applier
from infra import control
from nbd.server import NBDServer
from infra.heartbeat import read_beats
from journal.status import latest, pair_status
from tests.conftest import run_x2x

MiB = 1 << 20


class Recording:
    """A byte array that records every call, in order."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.events: list[str] = []
        self.lock = threading.Lock()

    def pread(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset:offset + length])

    def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        with self.lock:
            self.data[offset:offset + len(data)] = data
            self.events.append("write")

    def zero(self, offset: int, length: int, fua: bool) -> None:
        with self.lock:
            self.data[offset:offset + length] = bytes(length)
            self.events.append("zero")

    def trim(self, offset: int, length: int) -> None:
        self.zero(offset, length, False)

    def flush(self) -> None:
        with self.lock:
            self.events.append("flush")


def test_checkpoint_only_after_an_acknowledged_flush(broker, settings, pair_name, tmp_path):
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.write(bytes(4 * MiB))                  # a zero run: a ZERO op in the baseline
        f.write(os.urandom(4 * MiB))
    backend = Recording(12 * MiB)
    server = NBDServer("127.0.0.1", 0, {"t": backend}).start()
    try:
        uri = f"nbd://127.0.0.1:{server.port}/t"
        run_x2x("pair", "create", pair_name, "--source", str(src), "--target", uri)
        run_x2x("capture", pair_name, "--once")
        with open(src, "r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(MiB))
        run_x2x("capture", pair_name, "--once")
        seen: list[list[str]] = []

        def on_checkpoint(_pos) -> None:
            with backend.lock:
                seen.append(list(backend.events))
        spec = control.get_pair(settings, pair_name).spec
        stats = Applier(spec, uri, settings, on_checkpoint=on_checkpoint).run(
            until_caught_up=True)
    finally:
        server.stop()
    assert stats.checkpoints == 2 and len(seen) == 2
    for events in seen:
        assert events[-1] == "flush", events[-5:]
    assert "zero" in seen[0] and seen[0].count("write") >= 2
    assert bytes(backend.data) == src.read_bytes()


class SlowFlush(Recording):
    """A target whose disk takes ``delay`` seconds to flush (a device shared with a busy
    writer)."""

    def __init__(self, size: int, delay: float) -> None:
        super().__init__(size)
        self.delay = delay

    def flush(self) -> None:
        time.sleep(self.delay)
        super().flush()


def test_a_target_slow_to_flush_is_named_in_the_log_the_beats_and_status(
        broker, settings, pair_name, tmp_path, caplog):
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(2 * MiB))
    backend = SlowFlush(2 * MiB, 1.2)
    server = NBDServer("127.0.0.1", 0, {"t": backend}).start()
    try:
        uri = f"nbd://127.0.0.1:{server.port}/t"
        run_x2x("pair", "create", pair_name, "--source", str(src), "--target", uri)
        run_x2x("capture", pair_name, "--once")
        spec = control.get_pair(settings, pair_name).spec
        with caplog.at_level(logging.WARNING, logger="x2x.applier"):
            stats = Applier(spec, uri, settings).run(until_caught_up=True)
    finally:
        server.stop()
    assert stats.checkpoints == 1 and bytes(backend.data) == src.read_bytes()
    (warning,) = [r.getMessage() for r in caplog.records if "to make its writes" in r.message]
    assert uri in warning and "RPO" in warning
    assert 1.2 <= float(re.search(r"took (\d+\.\d) s", warning).group(1)) < 5, warning
    # Its beat says so (the slowest flush of the last minute), and so does x2x status.
    (rep,) = pair_status(pair_name, latest(read_beats(settings)), 0).replicas
    assert 1.2 <= rep.slowest_flush_s < 5
    (row,) = json.loads(run_x2x("status", pair_name, "--json").stdout)
    assert float(row["replicas"][0]["detail"]["flush_s"]) >= 1.2
    table = run_x2x("status", pair_name, env={"COLUMNS": "250"}).stdout
    shown = re.search(r"\(\w+, flush (\d+\.\d) s\)", table)
    assert shown and 1.2 <= float(shown.group(1)) < 5, table
