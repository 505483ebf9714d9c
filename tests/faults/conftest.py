"""The fault-injection suite's tools: real processes it kills, brokers of its own it stops
and freezes, and the tally it prints at the end of the run.

Every scenario ends by comparing source and target byte for byte; the bytes that differ
are added to ``bytes lost`` (which must stay 0). The summary line appears in every
``pytest`` / ``make test`` run that collected this folder:

    x2x faults: 3 capturer kills, 22 applier kills, 2 broker outages survived; bytes lost: 0
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from infra.net import free_port_run
from tests.conftest import x2x_bin

#: The session's tally: kills and outages survived, bytes lost.
TALLY: Counter[str] = Counter()
MiB = 1 << 20


def need(*binaries: str) -> None:
    for b in binaries:
        if shutil.which(b) is None:
            pytest.skip(f"{b} is not installed (qemu-utils / libnbd-bin)")


def bytes_differing(a: Path | str, b: Path | str) -> int:
    """How many bytes differ between two equal-sized files (C-speed per 4 MiB chunk)."""
    lost = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if not x and not y:
                return lost
            if x != y:
                n = max(len(x), len(y))
                diff = (int.from_bytes(x.ljust(n, b"\0"), "little")
                        ^ int.from_bytes(y.ljust(n, b"\0"), "little")).to_bytes(n, "little")
                lost += n - diff.count(0)


def converged(source: Path | str, target: Path | str) -> bool:
    """Compare and tally: every differing byte counts as lost."""
    lost = bytes_differing(source, target)
    TALLY["bytes lost"] += lost
    return lost == 0


class Proc:
    """An ``x2x`` child process with its own environment; stderr is collected by a thread
    so a test can wait for a log line while the process runs."""

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 banner: str | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.args = args
        # ``prefix``: e.g. ``ip netns exec NS`` to run it on a network of its own.
        self.proc = subprocess.Popen([*prefix, x2x_bin(), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.err: list[str] = []
        self.out: list[str] = []
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()
        self.banner = ""
        if banner is not None:
            self.banner = self.proc.stdout.readline()
            assert banner in self.banner, self.banner + self.stderr()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def stderr(self) -> str:
        return "".join(self.err)

    def wait_log(self, text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.err:
                if text in line:
                    return line
            assert self.proc.poll() is None, f"x2x {self.args} exited:\n{self.stderr()}"
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the log of x2x {self.args}:\n{self.stderr()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> str:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=timeout)
        self._reader.join(5)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)


class OwnBroker:
    """A broker (Apache Kafka, one node) in an X2X_HOME of its own, on a free port: the session broker
    is shared by every test and must never be stopped or frozen."""

    def __init__(self, home: Path, engine: str = "kafka", nodes: int = 1) -> None:
        # A run of ports no outgoing connection can hold (node N listens on port+N-1).
        self.home, self.port, self.engine, self.nodes = home, free_port_run(nodes), engine, nodes
        self.bootstrap = ",".join(f"127.0.0.1:{self.port + i}" for i in range(nodes))
        self.env = {"X2X_HOME": str(home), "X2X_BOOTSTRAP": self.bootstrap}

    def x2x(self, *args: str, check: bool = True, timeout: float = 120
            ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([x2x_bin(), *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise AssertionError(f"x2x {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self) -> None:
        self.x2x("broker", "up", "--port", str(self.port), "--engine", self.engine,
                 "--nodes", str(self.nodes))

    def down(self) -> None:
        self.x2x("broker", "down", check=False)

    def lose_data(self) -> None:
        """Stopped so that it comes back empty (Tansu in memory)."""
        assert self.engine == "tansu", "only Tansu in memory forgets by a restart"
        self.down()

    @property
    def pid(self) -> int:
        return json.loads((self.home / "broker" / "broker.json").read_text())["pid"]

    def freeze(self) -> None:
        """Unreachable without losing anything: the broker process is stopped."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def settings(self):
        from infra.kafka import KafkaSettings
        return KafkaSettings(self.bootstrap)


def _own(factory: pytest.TempPathFactory, engine: str):
    b = OwnBroker(factory.mktemp("own-broker-home"), engine)
    b.up()
    try:
        yield b
    finally:
        try:
            b.thaw()
        except (OSError, FileNotFoundError, KeyError, ValueError):
            pass
        b.down()


@pytest.fixture
def own_broker(tmp_path_factory: pytest.TempPathFactory):
    """Apache Kafka, one node, for this test alone."""
    yield from _own(tmp_path_factory, "kafka")


@pytest.fixture
def own_tansu(tmp_path_factory: pytest.TempPathFactory):
    """Tansu in memory: a broker that comes back empty after a restart, which is the
    engine's own behaviour (Apache Kafka keeps its log), for the journal-lost path."""
    yield from _own(tmp_path_factory, "tansu")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TALLY:
        return
    line = (f"x2x faults: {TALLY['capturer kills']} capturer kills, "
            f"{TALLY['applier kills']} applier kills, {TALLY['broker outages']} broker "
            f"outages, {TALLY['node kills']} Kafka node kills "
            f"({TALLY['leader elections']} partition leader and "
            f"{TALLY['controller elections']} controller elections), "
            f"{TALLY['node restarts']} node restarts, "
            f"{TALLY['automatic failovers']} automatic failovers survived; "
            f"bytes lost: {TALLY['bytes lost']}")
    terminalreporter.write_sep("=", "fault injection")
    terminalreporter.write_line(line)


@pytest.fixture
def net(broker):
    """The source host on a network namespace of its own (tests/net.py)."""
    from tests.net import SourceNet
    need("qemu-io")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    n = SourceNet(int(broker.bootstrap.rsplit(":", 1)[1]))
    yield n
    n.close()
