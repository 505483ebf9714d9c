"""``x2x broker up --engine kafka``: what a user gets wrong, and the clear error for each.

Every refusal leaves nothing running and no ``broker.json`` behind. Each test has its own
X2X_HOME and ports; the session broker is not touched.
"""
from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from infra.apache_kafka import java_major
from tests.conftest import free_port, run_x2x

pytestmark = pytest.mark.timeout(240)


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "X2X_BOOTSTRAP"}
    return {**env, "X2X_HOME": str(home), **extra}


def _nothing_runs(home: Path) -> bool:
    """No broker.json, and no process whose command line names this home."""
    if (home / "broker" / "broker.json").exists():
        return False
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmd.read_bytes()
            state = (cmd.parent / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if str(home).encode() in raw and state != "Z" and b"pytest" not in raw:
            return False
    return True


def _refused(home: Path, *args: str, says: str, **env: str) -> str:
    proc = run_x2x("broker", "up", *args, env=_env(home, **env), check=False)
    assert proc.returncode != 0, proc.stdout
    assert says in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert _nothing_runs(home)
    return proc.stderr


def test_java_versions_are_read_from_java_version_output() -> None:
    assert java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert java_major('openjdk version "21" 2023-09-19') == 21
    assert java_major('java version "1.8.0_392"') == 8
    assert java_major("no version here") is None


def test_no_java_is_refused_with_the_package_to_install(tmp_path: Path) -> None:
    _refused(tmp_path / "home", "--port", str(free_port()), says="openjdk-17-jre-headless",
             JAVA_HOME=str(tmp_path / "no-such-jdk"))


def test_too_old_a_java_is_refused(tmp_path: Path) -> None:
    # A JDK 11 stand-in: only its version banner matters, the broker is never started.
    jdk = tmp_path / "jdk11" / "bin"
    jdk.mkdir(parents=True)
    (jdk / "java").write_text('#!/bin/sh\necho \'openjdk version "11.0.22" 2024-01-16\' >&2\n')
    (jdk / "java").chmod(stat.S_IRWXU)
    err = _refused(tmp_path / "home", "--port", str(free_port()), says="is Java 11",
                   JAVA_HOME=str(jdk.parent))
    assert "Java 17" in err


def test_missing_jars_name_the_fetch_command(tmp_path: Path) -> None:
    empty = tmp_path / "libs"
    empty.mkdir()
    _refused(tmp_path / "home", "--port", str(free_port()), says="x2x broker fetch",
             X2X_KAFKA_LIBS=str(empty))


def test_a_failing_maven_fetch_is_reported_with_its_output(tmp_path: Path) -> None:
    """Real Maven, offline with an empty local repository: what a machine that cannot
    reach Maven Central sees."""
    user = tmp_path / "user"
    (user / ".m2").mkdir(parents=True)
    (user / ".m2" / "settings.xml").write_text(
        f"<settings><offline>true</offline><localRepository>{user / 'repo'}"
        f"</localRepository></settings>")
    libs = tmp_path / "libs"
    proc = run_x2x("broker", "fetch", check=False,
                   env=_env(tmp_path / "home", X2X_KAFKA_LIBS=str(libs),
                            MAVEN_OPTS=f"-Duser.home={user}"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fetching the Apache Kafka broker with Maven" in proc.stderr, proc.stderr
    assert "Maven Central" in proc.stderr and "x2x broker fetch" in proc.stderr
    assert not any(libs.glob("kafka_2.13-*.jar"))


def test_a_port_in_use_is_refused_and_nothing_starts(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _refused(tmp_path / "home", "--port", str(port), says=f"{port}")


def test_data_formatted_for_another_cluster_is_refused(tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    env = _env(home)
    run_x2x("broker", "up", "--port", str(port), env=env)
    run_x2x("broker", "down", env=env)
    layout = home / "broker" / "kafka" / "cluster.json"
    raw = json.loads(layout.read_text())
    raw["cluster_id"] = "AAAAAAAAAAAAAAAAAAAAAA"
    layout.write_text(json.dumps(raw))
    err = _refused(home, "--port", str(port), says="is formatted for Kafka cluster")
    assert "AAAAAAAAAAAAAAAAAAAAAA" in err and "cluster.json" in err
    # A different quorum size is refused the same way.
    _refused(home, "--port", str(port), "--nodes", "3", says="belongs to a 1-node cluster")


def test_a_node_that_does_not_come_up_is_reported_and_nothing_is_left(tmp_path: Path) -> None:
    err = _refused(tmp_path / "home", "--port", str(free_port()), says="at start-up",
                   X2X_KAFKA_HEAP="-Xmx1k")
    assert "broker.log" in err
