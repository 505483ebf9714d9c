"""Shared fixtures: one real embedded broker per test session, on a free port."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infra.net import free_port  # noqa: F401  (re-exported for the tests)

_names = itertools.count()


#: The engine the session broker runs: Apache Kafka, as in production, unless a run asks
#: for Tansu (X2X_TEST_ENGINE=tansu) for a quick look.
TEST_ENGINE = os.environ.get("X2X_TEST_ENGINE", "kafka")


@pytest.fixture(scope="session", autouse=True)
def x2x_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test, with or without the session broker, keeps its state in a temporary
    X2X_HOME: never in the user's ~/.x2x, and never state left by an earlier run."""
    home = tmp_path_factory.mktemp("x2x-home")
    os.environ["X2X_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def broker(x2x_home: Path):
    """The session's broker, started the way `x2x broker up` starts it."""
    from infra import broker as embedded
    from infra.net import free_port_run
    state = embedded.up(port=free_port_run(1), engine=TEST_ENGINE)
    os.environ["X2X_BOOTSTRAP"] = state.bootstrap
    yield state
    embedded.down()


@pytest.fixture
def settings(broker):
    from infra.kafka import KafkaSettings
    return KafkaSettings.resolve(broker.bootstrap)


@pytest.fixture
def pair_name(request: pytest.FixtureRequest) -> str:
    """A pair name unique in the session (the broker is shared)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40].strip("-")
    return f"{base}-{next(_names)}"


def x2x_bin() -> str:
    return shutil.which("x2x", path=str(Path(sys.executable).parent)) or "x2x"


def run_x2x(*args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a child process, as a user would."""
    proc = subprocess.run([x2x_bin(), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"x2x {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def noise_file(path: Path, size: int = 1 << 20) -> Path:
    """Random bytes for ``qemu-io write -s``: data, where ``write -P`` (one byte repeated)
    is journaled as a FILL op that carries none."""
    path.write_bytes(os.urandom(size))
    return path


def make_image(path: Path, size: int, seed: int = 1, data_fraction: float = 0.5,
               block: int = 64 * 1024) -> Path:
    """A sparse image where about ``data_fraction`` of the blocks hold random data (the
    benchmarks' maker, so tests and benchmarks build their volumes one way)."""
    from bench.common import sparse_image
    return sparse_image(path, size, data_fraction, seed=seed, block=block)


def cached_bytes(path: Path | str) -> int:
    """How much of ``path`` the page cache holds (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def uncached(path: Path | str) -> Path:
    """``path`` written out and dropped from the page cache; skips the test where the
    filesystem keeps its pages resident whatever is asked (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if cached_bytes(path):
        pytest.skip(f"the filesystem of {path} keeps its pages in memory (tmpfs?): "
                    "what a read leaves in the page cache cannot be seen")
    return Path(path)


def same_bytes(a: Path | str, b: Path | str, length: int | None = None) -> bool:
    from infra.volumes import volume_digest
    return volume_digest(str(a), length) == volume_digest(str(b), length)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The hostile-input figures: how many inputs each fuzzed parser saw and refused."""
    from tests.fuzz import summary
    lines = summary()
    if lines:
        terminalreporter.write_sep("=", "hostile input (fuzz)")
        for line in lines:
            terminalreporter.write_line(f"x2x fuzz: {line}")
