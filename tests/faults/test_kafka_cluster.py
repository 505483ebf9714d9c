"""A three-node Apache Kafka cluster losing nodes under real NBD traffic.

One cluster for the module (RF 3, ``min.insync.replicas`` 2), its own X2X_HOME and
ports. Each scenario runs a capturer and an applier as services, writes through the NBD
export with qemu-io (writes and FLUSHes), and SIGKILLs a node in the middle of it: the
leader of the pair's journal partition, or the active KRaft controller; or restarts every
node in turn. Afterwards:

* every client write was acknowledged (async: no failure at all; sync: only a stall,
  whose length is printed, until a new leader is elected);
* the applier never stopped (it stops on a seq gap or a repeated seq) and the journal
  holds each epoch's seqs exactly once, in order;
* the target is byte-identical to the source (bytes lost = 0 in the tally).

The killed node is started again at the end of each scenario, so the next one finds the
cluster whole.
"""
from __future__ import annotations

import random
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
from confluent_kafka.admin import AdminClient

from infra.reader import read_to_end
from infra.topics import journal_topic
from schemas import codec
from tests.faults.conftest import TALLY, MiB, OwnBroker, Proc, converged, need
from tests.faults.test_process_kills import start_capturer
from tests.integration.test_nbd_capture import make_pair, wait_beat

pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    b = OwnBroker(tmp_path_factory.mktemp("cluster-home"), "kafka", nodes=3)
    b.up()
    try:
        yield b
    finally:
        b.down()


def leader_of(cluster: OwnBroker, topic: str) -> int:
    admin = AdminClient(cluster.settings().admin())
    part = admin.list_topics(topic, timeout=10).topics[topic].partitions[0]
    return part.leader


def active_controller(cluster: OwnBroker) -> int:
    from infra import apache_kafka
    lay = apache_kafka.layout(cluster.home / "broker", cluster.port, cluster.nodes)
    found = apache_kafka.active_controller(cluster.home / "broker", lay)
    assert found is not None, "no KRaft quorum leader recorded"
    return found


class Writer(threading.Thread):
    """qemu-io rounds through the export until stopped: writes, then a FLUSH. Records
    each round's wall time and any failure."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.size, self.rng = uri, size, random.Random(seed)
        self.stop_ = threading.Event()
        self.rounds: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop_.is_set():
            args = ["qemu-io", "-f", "raw"]
            for _ in range(8):
                length = self.rng.choice([4096, 65536, 256 * 1024])
                off = self.rng.randrange(0, self.size - length) // 4096 * 4096
                args += ["-c", f"write -P {self.rng.randrange(1, 255)} {off} {length}"]
            args += ["-c", "flush", self.uri]
            t0 = time.monotonic()
            p = subprocess.run(args, text=True, capture_output=True, timeout=120)
            self.rounds.append(time.monotonic() - t0)
            if p.returncode != 0 or "failed" in p.stdout + p.stderr:
                self.failures.append(p.stdout + p.stderr)
                return

    def finish(self) -> None:
        self.stop_.set()
        self.join(150)
        assert not self.is_alive(), "the writer hung"


def journal_is_contiguous(cluster: OwnBroker, name: str) -> int:
    """Each epoch's seqs appear once, in order, from 1; returns how many entries."""
    entries = [codec.decode_entry(m.value())
               for m in read_to_end(cluster.settings(), journal_topic(name))]
    last: dict[int, int] = {}
    for e in entries:
        expected = last.get(e.epoch, 0) + 1
        assert e.first_seq == expected, (f"epoch {e.epoch}: entry starts at seq "
                                         f"{e.first_seq}, expected {expected}")
        last[e.epoch] = e.last_seq
    return len(entries)


def run_scenario(cluster: OwnBroker, tmp_path: Path, name: str, mode: str,
                 fault) -> Writer:
    """Capturer + applier + writer; ``fault(topic)`` is called mid-traffic."""
    need("qemu-io")
    s, size = cluster.settings(), 16 * MiB
    spec = make_pair(s, name, tmp_path, size, seed=hash(name) % 1000, data_fraction=0.3)
    cap = start_capturer(name, "--mode", mode, env=cluster.env)
    app = Proc("apply", name, env=cluster.env)
    writer = Writer(cap.uri, size, seed=len(name))
    try:
        wait_beat(s, name, lambda b: b.detail.get("baseline") == "done")
        writer.start()
        time.sleep(3)
        fault(journal_topic(name))
        time.sleep(3)
        writer.finish()
        assert not writer.failures, writer.failures[0]
        assert len(writer.rounds) >= 3, writer.rounds
        assert app.proc.poll() is None, f"the applier stopped:\n{app.stderr()}"
        assert "stopped (clean)" in cap.stop()
        assert app.proc.poll() is None, f"the applier stopped:\n{app.stderr()}"
        app.stop()
    finally:
        writer.stop_.set()
        cap.kill()
        app.kill()
    entries = journal_is_contiguous(cluster, name)
    cluster.x2x("apply", name, "--until-caught-up")
    assert converged(spec.source, spec.target)
    print(f"{name}: {len(writer.rounds)} write rounds, slowest {max(writer.rounds):.2f} s, "
          f"{entries} journal entries, target identical")
    return writer


@contextmanager
def killing_nodes(cluster: OwnBroker, election: str) -> Iterator[Callable[[int], None]]:
    """A function that SIGKILLs a node (tallied with the ``election`` it causes); every
    node it killed is started again on the way out, so the next scenario finds the
    cluster whole."""
    killed: list[int] = []

    def kill(node: int) -> None:
        cluster.x2x("broker", "node", "stop", str(node), "--kill")
        killed.append(node)
        TALLY["node kills"] += 1
        TALLY[election] += 1

    try:
        yield kill
    finally:
        for node in killed:
            cluster.x2x("broker", "node", "start", str(node))
            TALLY["node restarts"] += 1


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_partition_leader_killed_mid_replication(cluster: OwnBroker, tmp_path: Path,
                                                 mode: str) -> None:
    with killing_nodes(cluster, "leader elections") as kill:
        def fault(topic: str) -> None:
            node = leader_of(cluster, topic)
            kill(node)
            wait_until(lambda: leader_of(cluster, topic) not in (node, -1), "no new leader")

        writer = run_scenario(cluster, tmp_path, f"leader-kill-{mode}", mode, fault)
    # Sync writes wait for the journal: they stall until a new leader takes over (the
    # dead node's session, 4 s, plus the election) and none failed; how long is a figure.
    print(f"{mode} write rounds (8 writes and a FLUSH) took at most "
          f"{max(writer.rounds):.1f} s across the election")


def test_active_controller_killed_mid_replication(cluster: OwnBroker,
                                                  tmp_path: Path) -> None:
    with killing_nodes(cluster, "controller elections") as kill:
        def fault(topic: str) -> None:
            node = active_controller(cluster)
            kill(node)
            wait_until(lambda: active_controller(cluster) != node, "no new controller")

        run_scenario(cluster, tmp_path, "controller-kill", "async", fault)


def test_rolling_restart_of_every_node_under_traffic(cluster: OwnBroker,
                                                     tmp_path: Path) -> None:
    def fault(topic: str) -> None:
        for node in (1, 2, 3):
            cluster.x2x("broker", "node", "stop", str(node))
            cluster.x2x("broker", "node", "start", str(node))
            TALLY["node restarts"] += 1

    run_scenario(cluster, tmp_path, "rolling-restart", "async", fault)
