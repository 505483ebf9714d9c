"""Apache Kafka in KRaft mode as the broker x2x starts itself: the durable engine.

The broker's jars are pinned by the Maven project in ``infra/kafka-broker/`` and copied
into its ``lib/`` once (``make setup`` runs :func:`fetch`); starting a broker downloads
nothing. One node, or three on 127.0.0.1 (``--nodes 3``), each a combined controller and
broker with its own ports and directory under ``$X2X_HOME/broker/kafka/node-N``. Journal
topics then get the cluster's defaults: RF 3 and ``min.insync.replicas`` 2.

The cluster id and every port are chosen at the first start and kept in ``cluster.json``,
so a restart finds the same quorum and the same data. This module builds files and
command lines; starting, waiting and stopping processes is :mod:`infra.broker`'s.
"""
from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from infra.files import atomic_write, read_json, write_json
from infra.net import free_port_run
from journal.errors import BadInput, BrokerError

POM = Path(__file__).resolve().parent / "kafka-broker" / "pom.xml"
MIN_JAVA = 17
#: ``--auth``: ``none`` (PLAINTEXT, loopback only) or ``scram`` (SASL/SCRAM-SHA-512 for
#: clients, KRaft's StandardAuthorizer, ACLs per role: infra/acl.py).
AUTH_MODES = ("none", "scram")
ADMIN_USER = "admin"
#: Per node. Two cores and 24 GiB per machine here: the heap is not what limits a broker
#: (the page cache holds the log), so 1 GiB each leaves room for three nodes and the rest.
DEFAULT_HEAP = "-Xms256m -Xmx1g"
#: Kafka's own start script's collector settings (kafka-run-class.sh).
_JVM_FLAGS = ["-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
              "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
              "-Djava.awt.headless=true"]
#: x2x journal entries reach 4 MiB (infra/kafka.py); leave room for batching overhead.
MESSAGE_MAX_BYTES = 8 * 1024 * 1024
_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.apache.name = org.apache.kafka
logger.apache.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


# ---- jars and Java ----------------------------------------------------------------------

def libs_dir() -> Path:
    """Where the broker's jars are: ``X2X_KAFKA_LIBS``, else beside the pinned pom."""
    return Path(os.environ.get("X2X_KAFKA_LIBS") or POM.parent / "lib")


def _have_jars(libs: Path) -> bool:
    return any(libs.glob("kafka_2.13-*.jar"))


def fetch() -> Path:
    """Copy the pinned broker's jars into :func:`libs_dir` unless they are there already."""
    libs = libs_dir()
    if _have_jars(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("the Apache Kafka broker's jars are not installed and Maven is "
                          "missing to fetch them: install it (apt-get install maven), then "
                          "run 'x2x broker fetch' (or 'make setup')")
    proc = subprocess.run([mvn, "-q", "-B", "-f", str(POM), "package",
                           f"-DoutputDirectory={libs}"],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not _have_jars(libs):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-12:])
        raise BrokerError(f"fetching the Apache Kafka broker with Maven ({POM}) failed "
                          f"with exit code {proc.returncode}; check that Maven Central can "
                          f"be reached, then run 'x2x broker fetch' again:\n{tail}")
    return libs


def java() -> str:
    """The ``java`` to run the broker with, checked to be at least Java 17."""
    home = os.environ.get("JAVA_HOME")
    binary = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not binary or not Path(binary).exists():
        raise BrokerError(f"Java {MIN_JAVA} or newer is needed to run Apache Kafka and none "
                          f"was found: install it (apt-get install openjdk-17-jre-headless) "
                          f"or set JAVA_HOME; or use '--engine tansu' for a quick trial")
    out = subprocess.run([binary, "-version"], capture_output=True, text=True).stderr
    major = java_major(out)
    if major is None or major < MIN_JAVA:
        raise BrokerError(f"{binary} is Java {major or 'of an unknown version'}; Apache Kafka "
                          f"4 needs Java {MIN_JAVA} or newer: install openjdk-17-jre-headless "
                          f"or point JAVA_HOME at a newer JDK")
    return binary


def java_major(version_output: str) -> int | None:
    """17 from ``openjdk version "17.0.15"``, 8 from ``java version "1.8.0_392"``."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not m:
        return None
    first = int(m.group(1))
    return int(m.group(2) or 0) if first == 1 else first


def classpath() -> str:
    libs = libs_dir()
    if not _have_jars(libs):
        raise BrokerError(f"the Apache Kafka broker's jars are not in {libs}: run "
                          f"'x2x broker fetch' (or 'make setup') once to fetch them")
    return f"{libs}/*"


# ---- the cluster's layout ---------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    """One combined controller+broker."""

    id: int
    port: int
    controller_port: int


@dataclass(frozen=True)
class Layout:
    """What a cluster is made of; fixed at its first start."""

    cluster_id: str
    nodes: list[Node]
    auth: str = "none"

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [p for n in self.nodes for p in (n.port, n.controller_port)]

    def node(self, node_id: int) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise BadInput(f"the cluster has no node {node_id}; its nodes are "
                       f"{', '.join(str(n.id) for n in self.nodes)}")


def cluster_dir(broker_dir: Path) -> Path:
    d = broker_dir / "kafka"
    d.mkdir(parents=True, exist_ok=True)
    return d


def node_dir(broker_dir: Path, node: Node) -> Path:
    return cluster_dir(broker_dir) / f"node-{node.id}"


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("=")


def layout(broker_dir: Path, port: int, nodes: int, auth: str | None = None) -> Layout:
    """The cluster kept under ``broker_dir``, or a new one on ``port`` .. ``port+nodes-1``.

    A kept cluster keeps its id, controller ports (they are its quorum) and auth mode;
    its client ports follow ``port``. A different node count or auth mode is refused:
    the data belongs to the cluster it was made with. ``auth`` None: as kept, or none.
    """
    if nodes not in (1, 3):
        raise BadInput(f"--nodes {nodes}: give 1 (one broker) or 3 (a cluster that "
                       f"survives the loss of a node)")
    if auth is not None and auth not in AUTH_MODES:
        raise BadInput(f"--auth {auth!r}: choose one of {', '.join(AUTH_MODES)}")
    here = cluster_dir(broker_dir)
    path = here / "cluster.json"
    raw = read_json(path)
    if raw:
        kept = Layout(raw["cluster_id"], [Node(**n) for n in raw["nodes"]],
                      raw.get("auth", "none"))
        if len(kept.nodes) != nodes:
            raise BadInput(
                f"the broker data in {here} belongs to a {len(kept.nodes)}-node cluster: "
                f"start it with --nodes {len(kept.nodes)}, or stop it and remove that "
                f"directory to start afresh (its journals are then lost)")
        if auth is not None and auth != kept.auth:
            raise BadInput(
                f"the broker data in {here} belongs to a cluster with --auth {kept.auth}: "
                f"start it that way, or stop it and remove that directory to start "
                f"afresh (its journals are then lost)")
        chosen = Layout(kept.cluster_id, [Node(n.id, port + i, n.controller_port)
                                          for i, n in enumerate(kept.nodes)], kept.auth)
    else:
        controllers: list[int] = []
        taken = set(range(port, port + nodes))
        while len(controllers) < nodes:
            p = free_port_run(1)    # not an ephemeral port an outgoing connection holds
            if p not in taken:
                taken.add(p)
                controllers.append(p)
        chosen = Layout(new_cluster_id(), [Node(i + 1, port + i, controllers[i])
                                           for i in range(nodes)], auth or "none")
    record = {"cluster_id": chosen.cluster_id, "auth": chosen.auth,
              "nodes": [asdict(n) for n in chosen.nodes]}
    if record != raw:
        write_json(path, record)
    if chosen.auth == "scram":
        _write_admin_properties(broker_dir, chosen)
    return chosen


def admin_properties_path(broker_dir: Path) -> Path:
    return cluster_dir(broker_dir) / "admin.properties"


def admin_properties(broker_dir: Path) -> dict[str, str]:
    """The superuser's client settings of a ``--auth scram`` cluster ({} without auth)."""
    from infra.kafka import load_properties
    path = admin_properties_path(broker_dir)
    return load_properties(str(path)) if path.exists() else {}


def _write_admin_properties(broker_dir: Path, lay: Layout) -> None:
    """The superuser's password is chosen once; the file follows the client ports."""
    old = admin_properties(broker_dir)
    password = old.get("sasl.password") or secrets.token_urlsafe(24)
    props = {"bootstrap.servers": lay.bootstrap, "security.protocol": "SASL_PLAINTEXT",
             "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": ADMIN_USER,
             "sasl.password": password}
    if props != old:
        atomic_write(admin_properties_path(broker_dir),
                     "".join(f"{k}={v}\n" for k, v in props.items()).encode())


def _auth_properties(password: str) -> dict[str, object]:
    """SASL for clients (SCRAM, users kept in the cluster's metadata) and between the
    nodes; PLAIN with a static user on the controller listener, which SCRAM cannot serve
    (its users live in the metadata the controllers are there to serve)."""
    scram = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
             f'username="{ADMIN_USER}" password="{password}";')
    plain = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
             f'username="{ADMIN_USER}" password="{password}" user_{ADMIN_USER}="{password}";')
    return {
        "sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
        "sasl.mechanism.controller.protocol": "PLAIN",
        "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
        "listener.name.controller.plain.sasl.jaas.config": plain,
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": scram,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{ADMIN_USER}",
        "allow.everyone.if.no.acl.found": "false",
    }


def properties(lay: Layout, node: Node, data: Path, admin_password: str = "") -> str:
    """The node's ``server.properties``."""
    n = len(lay.nodes)
    isr = 2 if n >= 3 else 1
    voters = ",".join(f"{v.id}@127.0.0.1:{v.controller_port}" for v in lay.nodes)
    client = "SASL_PLAINTEXT" if lay.auth == "scram" else "PLAINTEXT"
    props: dict[str, object] = {
        "process.roles": "broker,controller",
        "node.id": node.id,
        "controller.quorum.voters": voters,
        "listeners": f"{client}://127.0.0.1:{node.port},"
                     f"CONTROLLER://127.0.0.1:{node.controller_port}",
        "advertised.listeners": f"{client}://127.0.0.1:{node.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": client,
        "listener.security.protocol.map": f"{client}:{client},CONTROLLER:{client}",
        "log.dirs": data,
        "num.partitions": 1,
        # Every topic x2x makes gets the cluster's replication: 3 copies, 2 in sync
        # before an acks=all write is acknowledged, on a three-node cluster.
        "default.replication.factor": n,
        "min.insync.replicas": isr,
        "offsets.topic.replication.factor": n,
        "transaction.state.log.replication.factor": n,
        "transaction.state.log.min.isr": isr,
        "share.coordinator.state.topic.replication.factor": n,
        "share.coordinator.state.topic.min.isr": isr,
        "group.initial.rebalance.delay.ms": 0,
        # x2x creates its topics itself, with their settings; a retry after a restart
        # must never get a journal back auto-created with the broker's defaults.
        "auto.create.topics.enable": "false",
        # A replica that missed acknowledged records never becomes leader.
        "unclean.leader.election.enable": "false",
        "message.max.bytes": MESSAGE_MAX_BYTES,
        "replica.fetch.max.bytes": MESSAGE_MAX_BYTES,
        # A node that died is declared dead after this long, and its partitions get new
        # leaders; Kafka's 9 s would come close to the capturer's stall limit
        # (X2X_JOURNAL_STALL, 10 s) after which sync writes fail with EIO.
        "broker.session.timeout.ms": 4000,
        "broker.heartbeat.interval.ms": 1000,
        # Records a history base deletes (DeleteRecords) leave the disk when this check
        # finds their whole segment below the journal's start: every 5 s (first after
        # 5 s) rather than Kafka's 5 minutes (first after 30 s), and the segment file is
        # removed 1 s later rather than 60 s (no x2x reader reads below the base), so a
        # windowed journal's disk follows its window (docs/operations.md).
        "log.retention.check.interval.ms": 5000,
        "log.initial.task.delay.ms": 5000,
        "log.segment.delete.delay.ms": 1000,
        # The cleaner compacts only x2x's status topic and Kafka's offsets: a few keys
        # per service or group. Kafka's 128 MiB map for them was 128 of the 172 MiB a
        # node's heap held at rest (RSS 342 MB, now 212); 16 MiB holds ~600,000 keys
        # per pass.
        "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
    }
    if lay.auth == "scram":
        props.update(_auth_properties(admin_password))
    return "".join(f"{k}={v}\n" for k, v in props.items())


def active_controller(broker_dir: Path, lay: Layout) -> int | None:
    """The node that leads the KRaft quorum now, as the newest quorum state on disk says
    (clients are never told: in KRaft, DescribeCluster names a random broker)."""
    best: tuple[int, int] | None = None
    for node in lay.nodes:
        raw = read_json(node_dir(broker_dir, node) / "data" / "__cluster_metadata-0"
                        / "quorum-state")
        if raw and raw.get("leaderId", -1) >= 0:
            seen = (int(raw["leaderEpoch"]), int(raw["leaderId"]))
            best = seen if best is None or seen > best else best
    return best[1] if best else None


def _meta_cluster_id(data: Path) -> str | None:
    try:
        text = (data / "meta.properties").read_text()
    except FileNotFoundError:
        return None
    m = re.search(r"^cluster\.id=(\S+)$", text, re.M)
    return m.group(1) if m else None


def prepare(broker_dir: Path, lay: Layout, jvm: str) -> None:
    """Write every node's settings and format its storage once; idempotent."""
    password = admin_properties(broker_dir).get("sasl.password", "")
    for node in lay.nodes:
        d = node_dir(broker_dir, node)
        data = d / "data"
        d.mkdir(parents=True, exist_ok=True)
        # 0600: with --auth it holds the superuser's password.
        atomic_write(d / "server.properties", properties(lay, node, data, password).encode())
        (d / "log4j2.properties").write_text(_LOG4J)
        found = _meta_cluster_id(data)
        if found is None:
            _format(jvm, d, lay.cluster_id, password if lay.auth == "scram" else "")
        elif found != lay.cluster_id:
            raise BrokerError(
                f"{data} is formatted for Kafka cluster {found}, not {lay.cluster_id} "
                f"recorded in {cluster_dir(broker_dir) / 'cluster.json'}: restore that "
                f"file, or stop the broker and remove {cluster_dir(broker_dir)} to start "
                f"afresh (its journals are then lost)")


def _format(jvm: str, d: Path, cluster_id: str, admin_password: str) -> None:
    # The superuser's SCRAM credential must be in the metadata before the first start:
    # the nodes themselves log in with it.
    scram = ([f"--add-scram=SCRAM-SHA-512=[name={ADMIN_USER},password={admin_password}]"]
             if admin_password else [])
    proc = subprocess.run(
        [jvm, *_log_flags(d), "-cp", classpath(), "kafka.tools.StorageTool", "format",
         # One argument: an id may begin with "-", which argparse takes for an option.
         f"--cluster-id={cluster_id}", "--config", str(d / "server.properties"),
         "--ignore-formatted", *scram],
        capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise BrokerError(f"formatting Kafka storage in {d} failed (exit code "
                          f"{proc.returncode}):\n{tail}")


def _log_flags(d: Path) -> list[str]:
    return [f"-Dlog4j2.configurationFile={d / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={d}"]


def command(broker_dir: Path, node: Node, jvm: str) -> list[str]:
    """The command line that runs one node in the foreground."""
    d = node_dir(broker_dir, node)
    heap = os.environ.get("X2X_KAFKA_HEAP", DEFAULT_HEAP).split()
    return [jvm, *heap, *_JVM_FLAGS, *_log_flags(d), "-cp", classpath(), "kafka.Kafka",
            str(d / "server.properties")]


def partition_bytes(broker_dir: Path, topic: str, partition: int = 0) -> int:
    """Bytes of ``topic``'s partition in the log segments of the embedded broker on disk
    (the largest copy among its nodes): what the broker holds, as measured by the tests
    and the benchmark. Index files are left out: Kafka preallocates them sparse."""
    # Segments Kafka has let go of (*.log.deleted) stay on disk for a while: counted.
    sizes = [sum(f.stat().st_size for f in d.glob("*.log*") if f.is_file())
             for d in broker_dir.glob(f"**/data/{topic}-{partition}") if d.is_dir()]
    return max(sizes, default=0)
