"""The deployment files are valid: systemd units verified by systemd-analyze and pointing
at x2x subcommands and options that exist; the Kafka compose file parses and is what
x2x expects of a production cluster."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import x2x_bin

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "infra" / "systemd"
UNIT_NAMES = ("x2x-capture@.service", "x2x-apply@.service", "x2x-base@.service",
              "x2x-watch@.service", "x2x-broker.service", "x2x-group-capture@.service")


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's syntax: sections, ``Key=value`` lines (a key may repeat), ``#`` comments."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert section is not None, f"{path.name}: {line!r} outside a section"
        section.setdefault(key.strip(), []).append(value.strip())
    return out


def env_example() -> dict[str, str]:
    env = {}
    for line in (UNITS / "x2x.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def exec_argv(unit: str, pair: str = "web") -> list[str]:
    """ExecStart as systemd runs it: %i, ${VAR} (one word) and $VAR (split) expanded."""
    service = parse_unit(UNITS / unit)["Service"]
    env = {**env_example(), "X2X_BROKER_PORT": "9092"}
    for assignment in service.get("Environment", []):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env.setdefault(key, value)
    argv = []
    for word in shlex.split(service["ExecStart"][0].replace("%i", pair)):
        if m := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env[m[1]])
        elif m := re.fullmatch(r"\$(\w+)", word):
            argv.extend(env.get(m[1], "").split())
        else:
            argv.append(word)
    return argv


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_unit_runs_a_real_x2x_command(unit: str) -> None:
    argv = exec_argv(unit)
    assert argv[0] == "/usr/local/bin/x2x"
    words = argv[1:]
    command = [w for w in words if not w.startswith("-")][:2 if unit.startswith(
        ("x2x-broker", "x2x-group")) else 1]
    helptext = subprocess.run([x2x_bin(), *command, "--help"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert helptext.returncode == 0, helptext.stderr
    for option in (w for w in words if w.startswith("--")):
        assert option in helptext.stdout, f"{unit}: x2x {' '.join(command)} has no {option}"


@pytest.mark.parametrize("unit", UNIT_NAMES)
def test_unit_restarts_and_stops_gracefully(unit: str) -> None:
    service = parse_unit(UNITS / unit)["Service"]
    assert service["Restart"] == ["on-failure"]
    assert float(service["RestartSec"][0]) > 0
    assert service["KillSignal"] == ["SIGTERM"]
    assert int(service["TimeoutStopSec"][0]) >= 30
    assert service["RestartPreventExitStatus"] == ["2"]   # BadInput: a restart cannot help


@pytest.mark.parametrize("unit", ["x2x-capture@.service", "x2x-apply@.service",
                                  "x2x-base@.service", "x2x-watch@.service",
                                  "x2x-group-capture@.service"])
def test_pair_units_can_reach_block_devices(unit: str) -> None:
    service = parse_unit(UNITS / unit)["Service"]
    for blocking in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert blocking not in service, f"{unit}: {blocking}= would hide /dev/sdX"
    assert service["EnvironmentFile"] == ["/etc/x2x/%i.env"]
    example = env_example()
    for var in ("X2X_NBD", "X2X_BOOTSTRAP", "X2X_KAFKA_CONFIG", "X2X_HOME"):
        assert var in example


def _usable_systemd_analyze() -> str | None:
    tool = shutil.which("systemd-analyze")
    if not tool:
        return None
    probe = subprocess.run([tool, "--version"], capture_output=True, text=True)
    return tool if probe.returncode == 0 else None


@pytest.mark.skipif(_usable_systemd_analyze() is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own checker, on instances of the templates; the x2x path is pointed at
    this venv's x2x, since verify checks that the executable exists."""
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text().replace("/usr/local/bin/x2x", x2x_bin())
        (tmp_path / name).write_text(text)
    (tmp_path / "x2x-capture@web.service").symlink_to("x2x-capture@.service")
    (tmp_path / "x2x-apply@web.service").symlink_to("x2x-apply@.service")
    (tmp_path / "x2x-watch@web.service").symlink_to("x2x-watch@.service")
    (tmp_path / "x2x-group-capture@db.service").symlink_to("x2x-group-capture@.service")
    units = [str(tmp_path / n) for n in ("x2x-capture@web.service", "x2x-apply@web.service",
                                         "x2x-watch@web.service",
                                         "x2x-group-capture@db.service",
                                         "x2x-broker.service")]
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"})
    assert proc.returncode == 0, proc.stderr
    # Only our units: the debug log also covers the system's own (and their quirks).
    problems = [line for line in proc.stderr.splitlines() if "x2x-" in line and
                re.search(r"(Unknown key|Failed to parse|Invalid|not executable|"
                          r"[Ii]gnoring|Missing|[Ww]arning)", line)]
    assert not problems, "\n".join(problems)
    # systemd's own view of a pair service (its debug dump, on stdout): no device
    # restriction.
    for unit in units[:2]:
        dump = subprocess.run(["systemd-analyze", "verify", "--man=no", unit],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"}).stdout
        assert "DevicePolicy: auto" in dump and "DeviceAllow:" not in dump, unit


def test_kafka_compose_is_a_three_broker_kraft_cluster() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc = yaml.safe_load((ROOT / "infra" / "compose" / "kafka.yml").read_text())
    services = doc["services"]
    brokers = {n: s for n, s in services.items() if s["image"].startswith("apache/kafka:")}
    assert len(brokers) == 3
    voters = None
    for name, svc in brokers.items():
        env = svc["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
        assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= 4 * 1024 * 1024   # x2x's batches
        voters = voters or env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters   # one quorum
        assert env["CLUSTER_ID"] == brokers[next(iter(brokers))]["environment"]["CLUSTER_ID"]
        assert any(str(v).endswith(":/var/lib/kafka/data") for v in svc["volumes"])
    assert len(voters.split(",")) == 3


def test_security_doc_lists_exactly_the_acls_each_role_gets() -> None:
    from infra import acl
    doc = (ROOT / "docs" / "security.md").read_text()
    rows = acl.table()
    missing = [r for r in rows if r not in doc]
    assert not missing, f"docs/security.md does not match infra/acl.py: {missing}"
