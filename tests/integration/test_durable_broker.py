"""The durable brokers x2x runs (Apache Kafka, and Tansu on a local SeaweedFS) keep
journals across restarts, with their offsets; ``x2x broker run`` serves in the foreground
and stops on SIGTERM.

Each test has its own X2X_HOME and ports: the session ``broker`` fixture is not touched.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from infra.kafka import KafkaSettings
from infra.topics import JOURNAL_CONFIG, ensure_topic
from tests.conftest import free_port, run_x2x, x2x_bin

pytestmark = pytest.mark.timeout(240)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "X2X_BOOTSTRAP"}
    return {**env, "X2X_HOME": str(home)}


def _create_topic(bootstrap: str, topic: str) -> None:
    # A function scope drops the admin client's connection before the broker stops:
    # Tansu waits ~5 s for open connections on SIGTERM.
    assert ensure_topic(KafkaSettings(bootstrap).check_reachable(), topic, JOURNAL_CONFIG)


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    p = Producer(KafkaSettings(bootstrap).producer())
    for v in values:
        p.produce(topic, v)
    assert p.flush(15) == 0


def _read(bootstrap: str, topic: str, timeout: float = 45.0) -> list[tuple[int, bytes]]:
    """Every record up to the partition's end. A consumer that got no answer within 10 s
    is replaced: a request sent into a broker still loading its store can otherwise wait
    librdkafka's whole socket timeout."""
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    while time.monotonic() < deadline:
        c = Consumer(KafkaSettings(bootstrap).consumer())
        c.assign([TopicPartition(topic, 0, 0)])
        out: list[tuple[int, bytes]] = []
        attempt_end = min(deadline, time.monotonic() + 10.0)
        try:
            while time.monotonic() < attempt_end:
                m = c.poll(0.5)
                if m is None:
                    continue
                if m.error():
                    if m.error().code() == -191:  # _PARTITION_EOF
                        return out
                    errors.append(str(m.error()))
                    continue  # transient: the broker is still loading
                out.append((m.offset(), m.value()))
        finally:
            c.close()
    raise AssertionError(f"no end of partition within {timeout} s; errors {errors[-5:]}")


def _wait_ready(home: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """``broker run`` records itself in broker.json once Tansu answers metadata requests."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"x2x broker run exited with {proc.returncode}"
        if (home / "broker" / "broker.json").exists():
            return
        time.sleep(0.1)
    raise AssertionError(f"x2x broker run was not ready within {timeout} s")


def _no_process_of(home: Path, port: int) -> bool:
    """Tansu no longer listens, and no weed process still uses this X2X_HOME."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmd.read_bytes()
            stat = (cmd.parent / "stat").read_text()
        except OSError:
            continue
        if str(home).encode() in raw and stat.split()[2] != "Z" and b"pytest" not in raw:
            return False
    return True


#: How each durable engine is started, and where it says its data lives.
DURABLE = {"kafka": (["--engine", "kafka"], "broker/kafka"),
           "tansu": (["--engine", "tansu", "--durable"], "s3://tansu/")}


@pytest.mark.parametrize("engine", sorted(DURABLE))
def test_durable_broker_keeps_records_and_offsets_across_restart(tmp_path: Path,
                                                                 engine: str) -> None:
    flags, storage = DURABLE[engine]
    home, port = tmp_path / "home", free_port()
    env = _env(home)
    bootstrap = f"127.0.0.1:{port}"
    topic = "x2x.journal.durable"
    first = [f"entry-{i}".encode() for i in range(20)]
    try:
        out = run_x2x("broker", "up", *flags, "--port", str(port), env=env).stdout
        assert storage in out
        _create_topic(bootstrap, topic)
        _produce(bootstrap, topic, first)
        assert _read(bootstrap, topic) == list(enumerate(first))

        assert "broker stopped" in run_x2x("broker", "down", env=env).stdout
        assert _no_process_of(home, port)
        assert (home / "broker" / ("seaweedfs" if engine == "tansu" else "kafka")).is_dir()

        # The same store served again, this time by the foreground supervisor (systemd's way).
        # Output to a file: a pipe nobody reads could stall the broker once it is full.
        fg_log = tmp_path / "run.log"
        with open(fg_log, "wb") as fg_out:
            fg = subprocess.Popen([x2x_bin(), "broker", "run", *flags, "--port", str(port)],
                                  env=env, stdout=fg_out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(home, fg)
            assert _read(bootstrap, topic) == list(enumerate(first))
            _produce(bootstrap, topic, [b"after-restart"])
            assert _read(bootstrap, topic)[-1] == (20, b"after-restart")
            assert '"foreground": true' in run_x2x("broker", "status", "--json",
                                                    env=env).stdout
            fg.send_signal(signal.SIGTERM)
            assert fg.wait(30) == 0
        except AssertionError:
            print(f"---- x2x broker run output ----\n{fg_log.read_text(errors='replace')}")
            raise
        finally:
            if fg.poll() is None:
                fg.kill()
        assert _no_process_of(home, port)
        assert not (home / "broker" / "broker.json").exists()
    finally:
        run_x2x("broker", "down", env=env, check=False)


def test_broker_run_refuses_a_second_broker_and_down_stops_it(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    env = _env(home)
    fg = subprocess.Popen([x2x_bin(), "broker", "run", "--port", str(port)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(home, fg)
        again = run_x2x("broker", "run", "--port", str(free_port()), env=env, check=False)
        assert again.returncode == 1
        assert "already runs" in again.stderr and "x2x broker down" in again.stderr
        # `x2x broker down` signals the supervisor, which stops Tansu and exits cleanly.
        assert "broker stopped" in run_x2x("broker", "down", env=env).stdout
        assert fg.wait(20) == 0
        assert _no_process_of(home, port)
    finally:
        if fg.poll() is None:
            fg.kill()


def test_durable_and_storage_exclude_each_other(tmp_path: Path) -> None:
    proc = run_x2x("broker", "up", "--engine", "tansu", "--durable", "--storage",
                   "memory://tansu/", "--port", str(free_port()),
                   env=_env(tmp_path / "home"), check=False)
    assert proc.returncode == 2
    assert "exclude each other" in proc.stderr


@pytest.mark.parametrize("flags, says", [
    (["--engine", "kafka", "--durable"], "Tansu's options"),
    (["--engine", "kafka", "--storage", "memory://tansu/"], "Tansu's options"),
    (["--engine", "tansu", "--nodes", "3"], "Tansu runs one node"),
    (["--engine", "kafka", "--nodes", "2"], "give 1"),
    (["--engine", "zookeeper"], "choose one of kafka, tansu"),
])
def test_engine_options_that_do_not_fit_are_refused(tmp_path: Path, flags: list[str],
                                                    says: str) -> None:
    home = tmp_path / "home"
    proc = run_x2x("broker", "up", *flags, "--port", str(free_port()), env=_env(home),
                   check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not (home / "broker" / "broker.json").exists()


@pytest.mark.parametrize("engine", sorted(DURABLE))
def test_broker_restart_mid_replication_continues_without_resync(tmp_path: Path,
                                                                 engine: str) -> None:
    """Capture, apply part, restart the durable broker, capture more: the applier resumes
    from its checkpoint (verified against the journal) in the same epoch, no resync."""
    import json
    from tests.conftest import make_image, same_bytes
    from tests.integration.test_replication import mutate

    home, port = tmp_path / "home", free_port()
    env = {**_env(home), "X2X_BOOTSTRAP": f"127.0.0.1:{port}"}
    src = make_image(tmp_path / "src.img", 8 << 20, seed=31, data_fraction=0.6)
    dst = tmp_path / "dst.img"
    try:
        run_x2x("broker", "up", *DURABLE[engine][0], "--port", str(port), env=env)
        run_x2x("pair", "create", "durable", "--source", str(src), "--target", str(dst),
                "--create-target", env=env)
        run_x2x("capture", "durable", "--once", env=env)
        first = json.loads(run_x2x("apply", "durable", "--until-caught-up", "--json",
                                   env=env).stdout)
        mutate(src, 0.05, seed=32)
        run_x2x("capture", "durable", "--once", env=env)      # journaled, not yet applied

        run_x2x("broker", "down", env=env)
        run_x2x("broker", "up", *DURABLE[engine][0], "--port", str(port), env=env)

        mutate(src, 0.05, seed=33)
        scan = json.loads(run_x2x("capture", "durable", "--once", "--json", env=env).stdout)
        assert scan["epoch"] == first["epoch"] and not scan["baseline"]
        after = json.loads(run_x2x("apply", "durable", "--until-caught-up", "--json",
                                   env=env).stdout)
        assert after["epoch"] == first["epoch"] and after["seq"] == scan["last_seq"]
        assert after["offset"] > first["offset"]
        assert same_bytes(src, dst)
    finally:
        run_x2x("broker", "down", env=env, check=False)
