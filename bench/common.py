"""What every scenario shares: the run context, figures, test images, timed children."""
from __future__ import annotations

import itertools
import math
import mmap
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from infra.kafka import KafkaSettings

if TYPE_CHECKING:
    from confluent_kafka import Producer
    from consumers.applier import ApplyStats
    from infra.heartbeat import BeatTail
    from journal.pairs import PairSpec
    from journal.status import ReplicaStatus
    from producers.scan import ScanResult

MiB = 1 << 20
GiB = 1 << 30
#: Pre-generated random data is reused by offset: generating it per write would make the
#: writer, not x2x, the bottleneck on a 2-core machine.
_POOL_SIZE = 64 * MiB


@dataclass
class Context:
    """One benchmark run: sizes depend on ``quick``; ``shared`` carries figures that
    later scenarios build on (the measured maximum rate, the pipeline's pair)."""

    quick: bool
    settings: KafkaSettings
    workdir: Path
    shared: dict[str, Any] = field(default_factory=dict)
    #: Peak RSS of every x2x child process, by role, across all scenarios.
    rss: list[dict[str, Any]] = field(default_factory=list)
    _names: int = 0

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def pair_name(self, scenario: str) -> str:
        self._names += 1
        return f"bench-{scenario}-{os.getpid()}-{self._names}"

    def dir(self, scenario: str) -> Path:
        d = self.workdir / scenario
        d.mkdir(parents=True, exist_ok=True)
        return d


#: The Debian package of each client a scenario may need.
_PACKAGES = {"nbdcopy": "libnbd-bin", "nbdinfo": "libnbd-bin", "qemu-img": "qemu-utils",
             "qemu-nbd": "qemu-utils"}


@contextmanager
def standalone(tools: tuple[str, ...]) -> Iterator[tuple[Path, KafkaSettings]]:
    """For a scenario run alone (``python -m bench.NAME``): exits unless ``tools`` are
    installed; yields a work directory and the settings of a one-node broker of its own
    (X2X_HOME and X2X_BOOTSTRAP point at them), both gone afterwards."""
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install {_PACKAGES.get(tool, tool)})")
    from infra import broker
    from infra.net import free_port
    home = Path(tempfile.mkdtemp(prefix="x2x-bench-"))
    os.environ["X2X_HOME"] = str(home / "home")
    state = broker.up(port=free_port())
    os.environ["X2X_BOOTSTRAP"] = state.bootstrap
    try:
        yield home, KafkaSettings.resolve(state.bootstrap)
    finally:
        broker.down()
        shutil.rmtree(home, ignore_errors=True)


def figure(metric: str, unit: str, x2x: float, peer_name: str, peer: float,
           better: str) -> dict[str, Any]:
    """One row of the table: x2x next to its peer; ratio is always x2x / peer."""
    assert better in ("higher", "lower")
    return {"metric": metric, "unit": unit, "x2x": round(float(x2x), 4),
            "peer_name": peer_name, "peer": round(float(peer), 4),
            "ratio": round(float(x2x) / float(peer), 4) if peer else None,
            "better": better}


def produce(producer: "Producer", topic: str, value: bytes) -> None:
    """Hand one record to librdkafka, serving delivery reports while its queue is full."""
    while True:
        try:
            producer.produce(topic, value)
            break
        except BufferError:
            producer.poll(0.05)
    producer.poll(0)


@contextmanager
def scratch_topic(settings: KafkaSettings, name: str) -> Iterator[str]:
    """A topic configured as a journal is, for a bare peer; deleted afterwards."""
    from infra.topics import JOURNAL_CONFIG, delete_topic, ensure_topic
    admin = settings.check_reachable()
    ensure_topic(admin, name, JOURNAL_CONFIG)
    try:
        yield name
    finally:
        delete_topic(admin, name)


def _warm_producer(settings: KafkaSettings, topic: str, **overrides: Any) -> "Producer":
    """A producer with the journal's settings, connected and its idempotent session
    started (one record delivered), as x2x's capturer is when a workload is timed."""
    from confluent_kafka import Producer
    producer = Producer(settings.producer(**overrides))
    producer.produce(topic, b"warm-up")
    if producer.flush(60):
        raise RuntimeError(f"bare producer could not reach {settings.bootstrap}")
    return producer


def bare_produce(settings: KafkaSettings, topic: str, path: str | Path) -> tuple[int, float]:
    """Produce a file in journal-sized records with the journal's producer settings
    (acks=all, idempotent) and flush: (records in the topic, the warm-up one included;
    seconds), the broker's own time for those bytes."""
    from journal.batch import DEFAULT_BUDGET
    with open(path, "rb") as f:
        return produce_all(settings, topic, iter(lambda: f.read(DEFAULT_BUDGET), b""))


def produce_all(settings: KafkaSettings, topic: str,
                values: Iterable[bytes]) -> tuple[int, float]:
    """Produce ``values`` as records with the journal's producer settings and flush:
    (records in the topic, the warm-up one included; seconds)."""
    producer = _warm_producer(settings, topic)
    t0 = time.monotonic()
    count = 1
    for value in values:
        produce(producer, topic, value)
        count += 1
    if producer.flush(300):
        raise RuntimeError(f"bare producer could not flush to {settings.bootstrap}")
    return count, time.monotonic() - t0


def bare_produce_at_depth(settings: KafkaSettings, topic: str, size: int, count: int,
                          depth: int) -> float:
    """Records/s of a bare producer (the journal's settings: acks=all, idempotent; the
    linger of a capture whose clients wait, WAITED_LINGER_MS) keeping at most ``depth``
    records of ``size`` bytes in flight, each slot reused once the broker acknowledged
    its record: what a client at queue depth ``depth`` gets when every write waits for
    the broker."""
    from producers.publisher import WAITED_LINGER_MS
    producer = _warm_producer(settings, topic, **{"linger.ms": WAITED_LINGER_MS})
    value = os.urandom(size)
    done = [0]

    def acked(err: Any, _msg: Any) -> None:
        if err is not None:
            raise RuntimeError(f"bare producer: {err}")
        done[0] += 1
    t0 = time.monotonic()
    sent = 0
    while done[0] < count:
        while sent < count and sent - done[0] < depth:
            producer.produce(topic, value, on_delivery=acked)
            sent += 1
        producer.poll(0.001 if sent - done[0] < depth else 0.1)
    return count / (time.monotonic() - t0)


#: A warm-up round, on a topic of its own: 10,000 records of 4 KiB at depth 16 (what
#: sync capture sends), 32 MiB in journal-sized records (a copy's), all of it read back
#: (an applier's fetches). Rounds go on for WARM_S seconds.
WARM_SMALL, WARM_LARGE = 10_000, 32 * MiB
#: Long enough for the small-records rate to stop climbing on these 2-CPU machines: it
#: went 4,500 -> 13,000 in the first 10 s, ~20,000 at 30 s and 30,000-38,000 (it
#: varies round to round) from 70 s on.
WARM_S = 90.0


def warm_broker(settings: KafkaSettings, label: str = "the broker",
                seconds: float = WARM_S) -> list[float]:
    """Run produce and fetch traffic through a just-started Apache Kafka for ``seconds``
    (long enough for its JIT to compile those paths), so the scenarios meet a broker as
    warm as a production one, which runs for months: returns the small-records rate of
    each round (every tenth printed as it goes).

    Cold, the JIT's compiler threads took half the broker's CPU: sync capture's random
    4 KiB writes ran at 4,900 IOPS where the same code on a warm broker gave 8,300-9,000, and
    the bare producer at depth 16 that the bench measured first ran at 11,800 records/s
    where it ran at 19,700 later in the same run."""
    from journal.batch import DEFAULT_BUDGET
    big = random.Random(7).randbytes(DEFAULT_BUDGET)
    rates: list[float] = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        with scratch_topic(settings, f"bench-warm-{os.getpid()}-{len(rates)}") as topic:
            rates.append(bare_produce_at_depth(settings, topic, 4096, WARM_SMALL, 16))
            produce_all(settings, topic, itertools.repeat(big, WARM_LARGE // len(big)))
            bare_consume(settings, topic)
        if len(rates) % 10 == 1:
            print(f"[bench] warming {label}: {rates[-1]:,.0f} small records/s "
                  f"({time.monotonic() - t0:.0f} s of {seconds:.0f})", file=sys.stderr,
                  flush=True)
    return rates


#: How the tables name the fairer peer of an applier (:func:`bare_consume` with
#: ``write_to``); its consumer settings are x2x's own (infra/kafka.py), as the bare
#: consume's are.
CONSUME_WRITE_PEER = ("bare confluent-kafka consume of the same topic + buffered pwrite "
                      "of each record to a new file, fsync at the end")


DISK_WRITE_PEER = ("the target disk alone: as many bytes written to a new file in 4 MiB "
                   "O_DIRECT pieces, fsync at the end")


def disk_write(path: Path, size: int) -> float:
    """Seconds the disk under ``path`` takes to store ``size`` bytes sequentially in a new
    file, as an applier's long runs do (O_DIRECT from an aligned buffer, buffered where
    the file system refuses it), durably: the floor of any apply or replay to it,
    nothing read or checked."""
    piece = 4 * MiB
    buf = mmap.mmap(-1, piece)
    buf.write(random.Random(5).randbytes(piece))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            out = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT)
        except OSError:
            out = os.dup(fd)
        t0 = time.monotonic()
        try:
            for off in range(0, size, piece):
                view = memoryview(buf)[:min(piece, size - off)]
                done = 0
                while done < len(view):
                    done += os.pwrite(out, view[done:], off + done)
                view.release()
            os.fsync(out)
        finally:
            os.close(out)
        return time.monotonic() - t0
    finally:
        os.close(fd)
        buf.close()
        path.unlink()


BESIDE_DISK_PEER = ("bare confluent-kafka consume of the same topic while the target disk "
                    "stores as many bytes (the disk peer's writes), both at once: until "
                    "both are done")


def consume_beside_disk(settings: KafkaSettings, topic: str, path: Path, size: int) -> float:
    """Seconds until a bare consume of ``topic`` and :func:`disk_write` of ``size`` bytes,
    started together, are both done: the floor of an applier on this machine, which
    needs both at once, sharing its CPUs and memory with the broker (each alone is
    faster, so neither alone is a floor an applier can reach)."""
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        consumed = pool.submit(bare_consume, settings, topic)
        written = pool.submit(disk_write, path, size)
        consumed.result()
        written.result()
    return time.monotonic() - t0


def bare_consume(settings: KafkaSettings, topic: str,
                 write_to: Path | None = None) -> tuple[int, float]:
    """Read ``topic`` from its start to its end: (record bytes, seconds). With
    ``write_to``, the fairer peer of an applier: each record's bytes are also written
    to that file, one after the other (a plain buffered ``pwrite`` per record, the file
    fsynced once at the end), as a consumer that stores what it reads would."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from infra.reader import next_batch
    consumer = Consumer(settings.consumer())
    consumer.assign([TopicPartition(topic, 0, 0)])
    fd = os.open(write_to, os.O_WRONLY | os.O_CREAT, 0o600) if write_to else -1
    t0 = time.monotonic()
    nbytes = 0
    deadline = time.monotonic() + 300
    try:
        while True:
            # Batches as the applier's own loop takes them: what is already fetched, or
            # the first record to come (consume() alone waits out its whole timeout
            # whenever fewer records than asked for are left).
            batch = next_batch(consumer, 500, 0.1)
            if not batch and time.monotonic() > deadline:
                raise RuntimeError(f"no answer while reading {topic}")
            for msg in batch:
                err = msg.error()
                if err is None:
                    if fd >= 0:
                        os.pwrite(fd, msg.value(), nbytes)
                    nbytes += len(msg.value())
                elif err.code() == KafkaError._PARTITION_EOF:
                    if fd >= 0:
                        os.fsync(fd)
                    return nbytes, time.monotonic() - t0
                else:
                    raise RuntimeError(f"reading {topic}: {err.str()}")
    finally:
        consumer.close()
        if fd >= 0:
            os.close(fd)


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / max(seconds, 1e-9) / 1e6


# -- images -----------------------------------------------------------------------------
class RandomPool:
    """Incompressible bytes, sliced at random offsets."""

    def __init__(self, size: int = _POOL_SIZE, seed: int = 1) -> None:
        self.data = memoryview(random.Random(seed).randbytes(size))

    def take(self, rng: random.Random, length: int) -> memoryview:
        start = rng.randrange(0, len(self.data) - length + 1)
        return self.data[start:start + length]


_pool: RandomPool | None = None


def pool() -> RandomPool:
    global _pool
    if _pool is None:
        _pool = RandomPool()
    return _pool


def random_image(path: Path, size: int, seed: int = 1) -> Path:
    """An image of incompressible data throughout (fresh bytes, not the reused pool,
    so no block repeats and the page cache holds it as any data)."""
    rng = random.Random(seed)
    chunk = 8 * MiB
    with open(path, "wb") as f:
        for off in range(0, size, chunk):
            f.write(rng.randbytes(min(chunk, size - off)))
    return path


def sparse_image(path: Path, size: int, data_fraction: float, seed: int = 1,
                 block: int = 64 * 1024) -> Path:
    """``data_fraction`` of 64 KiB blocks hold random data, the rest are holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, block):
            if rng.random() < data_fraction:
                f.seek(off)
                f.write(pool().take(rng, min(block, size - off)))
    return path


def empty_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def mutate_blocks(path: Path, fraction: float, seed: int, block: int = 4096) -> int:
    """Overwrite ``fraction`` of the ``block``-sized blocks at random; bytes changed."""
    rng = random.Random(seed)
    size = path.stat().st_size
    picks = rng.sample(range(size // block), int(size // block * fraction))
    fd = os.open(path, os.O_RDWR)
    try:
        for i in sorted(picks):
            os.pwrite(fd, pool().take(rng, block), i * block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(picks) * block


def drop_file(path: Path) -> None:
    path.unlink(missing_ok=True)


# -- children ---------------------------------------------------------------------------
def x2x_cmd() -> list[str]:
    """The x2x CLI of this interpreter's environment, as a user would run it."""
    exe = shutil.which("x2x", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-c", "from cli.app import main; main()"]


@dataclass
class ChildResult:
    returncode: int
    seconds: float
    max_rss_bytes: int
    stdout: str
    stderr: str


class _PeakWatcher:
    """Polls a child's VmHWM (its peak resident set, per address space, so reset by exec).

    Not ru_maxrss from wait4: Linux carries the pre-exec high-water mark into it, i.e. a
    forked child inherits this (large) benchmark process's RSS as its own peak.
    """

    def __init__(self, pid: int, every: float = 0.05) -> None:
        import threading
        self.pid, self.every, self.peak = pid, every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._done.is_set():
            try:
                for line in open(f"/proc/{self.pid}/status"):
                    if line.startswith("VmHWM:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
                        break
            except OSError:
                return
            self._done.wait(self.every)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


_watchers: dict[int, _PeakWatcher] = {}


def start(args: list[str], peak_every: float = 0.05) -> subprocess.Popen[str]:
    """A child whose peak RSS is polled every ``peak_every`` seconds (:func:`finish`
    reports it): often where memory is the figure, seldom where the child's speed is
    measured beside a peer that nothing polls."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _watchers[proc.pid] = _PeakWatcher(proc.pid, peak_every)
    return proc


def finish(proc: subprocess.Popen[str], ctx: Context | None = None, role: str = "",
           scenario: str = "", t0: float | None = None) -> ChildResult:
    """Wait for a child; its peak RSS is the last VmHWM seen before it exited (the
    watcher polls while the child lives, so a final spike shorter than the poll interval
    can be missed)."""
    out, err = _drain(proc)
    proc.wait()
    watcher = _watchers.pop(proc.pid, None)
    res = ChildResult(proc.returncode, time.monotonic() - (t0 or time.monotonic()),
                      watcher.stop() if watcher else 0, out, err)
    if ctx is not None and role:
        ctx.rss.append({"scenario": scenario, "role": role, "max_rss_bytes": res.max_rss_bytes})
    return res


def _drain(proc: subprocess.Popen[str]) -> tuple[str, str]:
    # Read both pipes to their end in threads so a chatty child never blocks on a full
    # pipe (the child may have been started long before we wait for it).
    import threading
    bufs: dict[str, str] = {}

    def read(name: str, stream: Any) -> None:
        bufs[name] = stream.read() if stream else ""

    threads = [threading.Thread(target=read, args=("out", proc.stdout)),
               threading.Thread(target=read, args=("err", proc.stderr))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bufs["out"], bufs["err"]


def run_x2x(ctx: Context, *args: str, role: str = "", scenario: str = "",
            timeout: float = 1800) -> ChildResult:
    """Run ``x2x ARGS`` to completion; raise with its stderr if it fails."""
    t0 = time.monotonic()
    proc = start([*x2x_cmd(), *args])
    res = finish(proc, ctx, role, scenario, t0)
    if res.returncode != 0:
        raise RuntimeError(f"x2x {' '.join(args)} exited {res.returncode}: "
                           f"{res.stderr.strip()[-2000:]}")
    return res


# -- peers ------------------------------------------------------------------------------
def rsync_stats(output: str) -> dict[str, int]:
    """Numbers from ``rsync --stats`` (they carry thousands separators)."""
    stats = {}
    for key, label in (("bytes_sent", "Total bytes sent"), ("literal", "Literal data"),
                       ("matched", "Matched data")):
        m = re.search(rf"{label}: ([\d,]+)", output)
        if m:
            stats[key] = int(m.group(1).replace(",", ""))
    return stats


def timed_run(*cmd: str) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def require(*tools: str) -> str | None:
    """A reason to skip when a peer tool is missing, else None."""
    missing = [t for t in tools if shutil.which(t) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: the value was actually observed)."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# -- x2x in process ---------------------------------------------------------------------
def make_pair(ctx: Context, scenario: str, source: Path, target: Path,
              block_size: int = 64 * 1024) -> "PairSpec":
    """A pair on the run's broker; the target is created sparse if missing."""
    from infra import control
    from journal.pairs import PairSpec
    size = source.stat().st_size
    if not target.exists():
        empty_image(target, size)
    spec = PairSpec(ctx.pair_name(scenario), str(source), str(target), block_size, size)
    control.create_pair(ctx.settings, spec)
    return spec


def delete_pair(ctx: Context, spec: "PairSpec") -> None:
    """Free the broker's memory (its storage is in RAM) once a scenario is done."""
    from infra import control
    control.delete_pair(ctx.settings, spec.name)


def capture(ctx: Context, spec: "PairSpec") -> "ScanResult":
    from producers.scan import scan_once
    return scan_once(spec, ctx.settings)


def apply_all(ctx: Context, spec: "PairSpec", target: str | None = None,
              store_dir: Path | None = None,
              marks: dict[str, float] | None = None) -> tuple["ApplyStats", float]:
    """Apply everything the journal holds now (an empty point-in-time limit stops at its
    end); with ``store_dir``, from a fresh checkpoint, as a new replica would. ``marks``
    gets ``first_batch_s``: seconds until the first batch of records was read (the
    applier's start: broker, control topic and checkpoint checks)."""
    from consumers.applier import Applier
    from consumers.checkpoint import CheckpointStore
    from journal.sequence import Limit
    target = target or spec.target
    store = CheckpointStore(spec.name, target, directory=store_dir) if store_dir else None
    t0 = time.monotonic()

    def progress(applier: "Applier") -> None:
        if marks is not None and "first_batch_s" not in marks and \
                applier.read_position.offset >= 0:
            marks["first_batch_s"] = time.monotonic() - t0

    stats = Applier(spec, target, ctx.settings, store=store, limit=Limit()).run(
        on_progress=progress)
    return stats, time.monotonic() - t0


def replica_of(settings: KafkaSettings, pair: str, target: str,
               tail: "BeatTail | None" = None) -> "ReplicaStatus | None":
    """The target's row of ``x2x status`` (lag, RPO), computed from the heartbeats as
    status computes it (``tail``: followed, as ``x2x status --watch`` follows them)."""
    from infra.heartbeat import read_beats
    from journal.clock import now_ms
    from journal.status import latest, pair_status
    beats = tail.latest() if tail else latest(read_beats(settings))
    st = pair_status(pair, beats, now_ms())
    return next((r for r in st.replicas if r.target == target), None)


def sample_rpo(settings: KafkaSettings, pair: str, target: str, stop: threading.Event,
               out: list[float], begin: threading.Event | None = None) -> threading.Thread:
    """A started thread appending the target's RPO to ``out`` every half second, from
    ``begin`` (if given) until ``stop``; the heartbeats followed by one consumer, as
    ``x2x status --watch`` follows them (one read of the whole status topic per sample
    cost the broker and this process ~1 CPU second per 30 s, which the workload
    measured beside it paid)."""
    from infra.heartbeat import BeatTail

    def run() -> None:
        with BeatTail(settings) as tail:
            if begin is not None:
                begin.wait()
            while not stop.wait(0.5):
                r = replica_of(settings, pair, target, tail)
                if r is not None:
                    out.append(r.rpo_s or 0.0)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def same_volume(a: str | Path, b: str | Path, length: int | None = None) -> bool:
    from infra.volumes import volume_digest
    return volume_digest(str(a), length) == volume_digest(str(b), length)
