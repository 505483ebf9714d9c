"""Benchmark: the x2x NBD capturer (each mode, journaling to the embedded broker) against
``qemu-nbd`` serving a plain raw file, on the same machine, in the same run. Both serve
over a unix socket, as to a client on the same host, and over TCP on 127.0.0.1 (x2x in
async mode only); each x2x figure is set against the better of qemu-nbd's two.

* sequential: ``nbdcopy`` of 1 GiB of incompressible data into the export, as the issue
  states it: in async mode a write is acknowledged once it is on the source and the
  journal follows (the backlog stays on the source, and a burst without FLUSH is shipped
  once the clients pause, within ``X2X_ASYNC_HOLD``);
* sequential with ``--flush``: the same, ending with a flush: in async mode that is
  durable on the source; in flush-sync and sync mode it means "all of it acknowledged by
  the broker", so this time includes the whole journal;
* random 4 KiB writes: ``qemu-img bench -w`` with a large prime stride (offsets jump
  around the volume), queue depth 16, ending with a flush. qemu-img writes one byte value
  everywhere, which x2x journals as FILL ops, without the bytes: these rows show the
  server's own cost per request;
* random 4 KiB reads of the same offsets, queue depth 16, from the page cache (a guest
  reading its disk; the same in every mode);
* random 4 KiB writes of random data: ``fio`` with its nbd engine (libnbd), new bytes
  every write, queue depth 16, random offsets, ending with a flush: what a guest's
  writes put in the journal.

The random writes land on what the copy wrote, still in the page cache, as a guest's
writes land on a migrated disk. That costs qemu-nbd more than x2x on Linux 6.x: a
buffered write's folio is as large as the write, so qemu-nbd's copy leaves 1 MiB folios
and each later 4 KiB write into one walks its 256 blocks (~22 us of kernel time on 6.18),
while x2x writes the source in 64 KiB pieces (``infra.volume.WRITE_PIECE``, 4.8 us). On a
new, sparse file, where no such folios exist, qemu-nbd is the faster: about 33,000 IOPS
over a unix socket against x2x's 23,000 on this 2-CPU machine (measured 2026-12-05).

Beside qemu-nbd, the broker's own limits, with the journal's producer settings (acks=all,
idempotent): a bare produce of the same bytes in journal-sized records (linger 5 ms; the
floor of ``--flush``, which waits for all of it on the broker), and a bare producer
keeping 16 records of 4 KiB in flight (at sync mode's linger, WAITED_LINGER_MS; the floor of sync
mode's random writes at depth 16, where every write waits for the broker), measured at the
start and again right after sync mode's random writes, on a broker in the same state.
Sync mode's random writes are also set against the better peer's floor, min(qemu-nbd,
that bare producer), as flush-sync's ``--flush`` is against min(qemu-nbd, the bare
produce of the same bytes): a server that journals each write cannot outrun both the
server that does not and the broker. Sync mode's random writes and that bare producer
are also set side by side by the CPU they cost per write (this process and the broker):
the capturer's per write times the rate says how near it runs to one core, all its
Python can use under the interpreter lock. And by time: a journal record's time in
flight (from the publisher's own count, against a bare producer's round trip of one
record of the same size at a time, right after) and its whole cycle, the writes' time
per record: what is not in flight is the capturer's and its client's. Whether any server
could reach that floor here: the machine's ceiling for writes each journaled before its
reply, all CPUs busy on the cheapest server's CPU per write (qemu-nbd or x2x async) plus
the bare producer's and broker's per record, set against the bare producer; and how much
of the CPUs sync mode and qemu-nbd kept busy. Whose a sync record's extra time in flight
is: while fio writes to the sync capture as fast as it can, a bare producer's round trip
of one record of the same size from the capturer's own process, against from another.

Prints a table and writes ``bench/results/nbd_capture.json``. Not a test: no timed asserts.

    .venv/bin/python -m bench.nbd_capture [--size-mib 1024] [--rand-count 20000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bench.cpu import cpu_seconds, snapshot
from infra.net import free_port
from producers.publisher import WAITED_LINGER_MS

if TYPE_CHECKING:
    from infra.kafka import KafkaSettings

MiB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "nbd_capture.json"
STRIDE = 4096 * 7919      # a prime number of pages: offsets visit the volume out of order


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def timed(*cmd: str) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.monotonic() - t0


def broker_pid() -> int | None:
    from infra import broker
    state = broker.status()
    return state.pid if state else None


def run_workloads(uri: str, data: Path, size: int, rand_count: int,
                  server_pid: int, settle: Callable[[], None] | None = None,
                  journal: Callable[[], tuple[int, float, int]] | None = None
                  ) -> dict[str, float]:
    """The four workloads; for the plain copy also the CPU seconds per GiB each process
    spent (the server, the broker shipping the journal meanwhile, nbdcopy): on a small
    machine those, not the wire, decide who is faster. Between two, untimed, a client
    FLUSH (the source's fsync) and then ``settle`` leave nothing of one for the next to
    pay for: for x2x, ``settle`` puts all of it on the broker, since an async FLUSH does
    not wait for the journal. (Without the FLUSH, the random writes' closing flush paid
    the writeback of the copy before them: sync mode's 2,000 took 0.88 s, not 0.55.)
    ``journal`` (x2x) says (records acknowledged, their seconds in flight, record bytes
    sent) so far: over the random writes of data, how large a record is and how long
    it flies."""
    def between() -> None:
        timed("qemu-io", "-f", "raw", "-c", "flush", uri)
        if settle is not None:
            settle()
    flushed_s = timed("nbdcopy", "--flush", "--request-size=1048576", str(data), uri)
    between()
    bpid = broker_pid()
    before, children = _cpu_now(server_pid, bpid), _children_cpu()
    seq_s = timed("nbdcopy", "--request-size=1048576", str(data), uri)
    gib = size / (1 << 30)
    now = _cpu_now(server_pid, bpid)
    cpu = {"seq_server_cpu_s_per_GiB": (now[0] - before[0]) / gib,
           "seq_broker_cpu_s_per_GiB": (now[1] - before[1]) / gib,
           "seq_nbdcopy_cpu_s_per_GiB": (_children_cpu() - children) / gib}
    between()
    before = _cpu_now(server_pid, bpid)
    rand_s = timed("qemu-img", "bench", "-w", "-t", "none", "-f", "raw", "-s", "4096",
                   "-S", str(STRIDE), "-c", str(rand_count), "-d", "16", "--flush-interval",
                   str(rand_count), uri)
    cpu |= _per_op(before, server_pid, bpid, rand_count, "rand")
    # A guest reading its disk: the same offsets read back, from the page cache on
    # both servers (the copy and the writes just put them there).
    read_s = timed("qemu-img", "bench", "-t", "none", "-f", "raw", "-s", "4096",
                   "-S", str(STRIDE), "-c", str(rand_count), "-d", "16", uri)
    between()
    before, children, machine = _cpu_now(server_pid, bpid), _children_cpu(), snapshot()
    records = journal() if journal is not None else None
    data_s = fio_random_writes(uri, size, rand_count)
    cpu |= _per_op(before, server_pid, bpid, rand_count, "data")
    # fio's own CPU and the whole machine's (every process and the kernel), per write;
    # both hold fio's start-up too, so are a little high.
    cpu["data_client_cpu_us_per_op"] = (_children_cpu() - children) * 1e6 / rand_count
    cpu["data_machine_cpu_us_per_op"] = (snapshot().busy - machine.busy) * 1e6 / rand_count
    if journal is not None and records is not None:
        cpu |= _records(records, journal(), data_s, rand_count)
    return {"seq_seconds": seq_s, "seq_MBps": size / seq_s / 1e6,
            "seq_flush_seconds": flushed_s, "seq_flush_MBps": size / flushed_s / 1e6,
            "rand_seconds": rand_s, "rand_iops": rand_count / rand_s,
            "rand_read_iops": rand_count / read_s,
            "data_seconds": data_s, "data_iops": rand_count / data_s, **cpu}


def fio_random_writes(uri: str, size: int, count: int) -> float:
    """Seconds ``fio`` took for ``count`` random 4 KiB writes of random data at depth 16
    and the closing flush, by its own clock (its start-up, ~0.25 s, is not the
    server's)."""
    out = subprocess.run([*fio_writes(uri, size), f"--number_ios={count}", "--end_fsync=1",
                          "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    write = json.loads(out[out.index("{"):])["jobs"][0]["write"]
    if write["total_ios"] != count:
        raise RuntimeError(f"fio wrote {write['total_ios']} times, not {count}: {uri}")
    return count / write["iops"]


def fio_writes(uri: str, size: int) -> list[str]:
    """fio's random 4 KiB writes of random data to ``uri`` at depth 16 (add how many, or
    for how long)."""
    return ["fio", "--name=rand-data", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            "--bs=4k", "--iodepth=16", f"--size={size}",
            # New bytes every write: fio's default reuses one buffer (scrambled a little),
            # which Kafka's compression then finds across the writes of a record.
            "--refill_buffers"]


def _records(before: tuple[int, float, int], after: tuple[int, float, int],
             seconds: float, writes: int) -> dict[str, float]:
    """The journal's records over ``seconds`` of ``writes`` random writes of data: count,
    writes per record, mean size, mean time in flight, and the cycle (the time per
    record the writes took; one record in flight at a time in sync mode, the rest of
    it is on the capturer's side)."""
    n = max(after[0] - before[0], 1)
    return {"data_records": n, "data_writes_per_record": writes / n,
            "data_record_bytes": (after[2] - before[2]) / n,
            "data_record_in_flight_us": (after[1] - before[1]) * 1e6 / n,
            "data_record_cycle_us": seconds * 1e6 / n}


def _cpu_now(pid: int, bpid: int | None) -> tuple[float, float]:
    """CPU seconds so far of ``pid`` and of the broker (``bpid``; 0 without one)."""
    return cpu_seconds(pid), cpu_seconds(bpid) if bpid else 0.0


def _per_op(before: tuple[float, float], pid: int, bpid: int | None, ops: int,
            what: str) -> dict[str, float]:
    """CPU microseconds per op since ``before`` of ``pid`` and of the broker."""
    now = _cpu_now(pid, bpid)
    return {f"{what}_server_cpu_us_per_op": (now[0] - before[0]) * 1e6 / ops,
            f"{what}_broker_cpu_us_per_op": (now[1] - before[1]) * 1e6 / ops}


def _children_cpu() -> float:
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_qemu_nbd(work: Path, data: Path, size: int, rand_count: int,
                   unix: bool) -> dict[str, float]:
    """qemu-nbd on a raw file, over TCP on 127.0.0.1 or over a unix socket. Both are
    measured: qemu-nbd 7.2 over TCP stalls small writes on delayed ACKs (about 40 ms per
    queue-depth's worth), which would flatter x2x; the unix socket shows what it can do."""
    image = work / "qemu-nbd.img"
    with open(image, "wb") as f:
        f.truncate(size)
    port, sock = free_port(), work / "qemu-nbd.sock"
    where = ["-k", str(sock)] if unix else ["-b", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-x", "disk", *where, "-t", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if unix:
            deadline = time.monotonic() + 20
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            uri = f"nbd+unix:///disk?socket={sock}"
        else:
            wait_port(port)
            uri = f"nbd://127.0.0.1:{port}/disk"
        return run_workloads(uri, data, size, rand_count, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
        image.unlink()


def bench_x2x(work: Path, data: Path, size: int, rand_count: int,
              mode: str = "async", unix: bool = True) -> dict[str, float]:
    """x2x's NBD capture, in this process, journaling to the broker (no applier), over a
    unix socket as a client on the same host would reach it (``--nbd PATH``), or over
    TCP on 127.0.0.1."""
    from infra import control
    from infra.kafka import KafkaSettings
    from journal.pairs import PairSpec
    from producers.journaling import Mode
    from producers.nbd_capture import NBDCapture

    source, target = work / "x2x-src.img", work / "x2x-dst.img"
    for p in (source, target):
        with open(p, "wb") as f:
            f.truncate(size)
    settings = KafkaSettings.resolve()
    name = f"bench-{os.getpid()}"
    spec = PairSpec(name, str(source), str(target), 65536, size)
    control.create_pair(settings, spec)
    cap = NBDCapture(spec, settings, "127.0.0.1", 0, Mode.parse(mode),
                     path=str(work / "x2x.sock") if unix else None).start()
    try:
        while cap.baseline and not cap.baseline.finished:   # a sparse source: quick
            time.sleep(0.05)
        cap.sync_point()
        out = run_workloads(cap.uri, data, size, rand_count, os.getpid(),
                            lambda: cap.sync_point(300),
                            lambda: (cap.pub.records_acked, cap.pub.ack_seconds,
                                     cap.pub.bytes_sent))
        out["journal_bytes_sent"] = cap.pub.bytes_sent
        if mode == "sync":
            out |= round_trips_beside(settings, cap.uri, size, out["data_record_bytes"],
                                      rand_count)
    finally:
        report = cap.stop()
        control.delete_pair(settings, name)
    out["clean_stop"] = report.clean
    return out


def round_trips_beside(settings: KafkaSettings, uri: str, size: int, record_bytes: float,
                       writes: int) -> dict[str, float]:
    """While fio writes random data to ``uri`` (the sync capture in this process) as fast
    as it can: a bare producer's round trip of one record of ``record_bytes`` at a time,
    from this process and from another. Where a sync record's time in flight goes: the
    broker and the machine's load slow both alike; what slows only the first is the
    capturer's process (its delivery report waiting for a thread to wake and take the
    interpreter lock from the thread serving the next writes)."""
    import multiprocessing
    from bench.common import scratch_topic
    fio = subprocess.Popen([*fio_writes(uri, size), "--time_based", "--runtime=120"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with scratch_topic(settings, f"bench-beside-{os.getpid()}") as topic:
            time.sleep(1.0)                 # fio's start-up: its writes under way
            own = round_trip_us(settings, topic, record_bytes, writes)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                other = pool.apply(round_trip_us, (settings, topic, record_bytes, writes))
            if fio.poll() is not None:
                raise RuntimeError(f"fio stopped writing to {uri} (exit {fio.returncode})")
    finally:
        fio.terminate()
        fio.wait(30)
    return {"beside_own_round_trip_us": own, "beside_other_round_trip_us": other}


def round_trip_us(settings: KafkaSettings, topic: str, record_bytes: float,
                  writes: int) -> float:
    """Mean microseconds a bare producer takes for one record of ``record_bytes``, one at
    a time, over a fifth as many records as ``writes`` (at least 100). A process of its
    own runs this too: importable, its arguments picklable."""
    from bench.common import bare_produce_at_depth
    return 1e6 / bare_produce_at_depth(settings, topic, max(int(record_bytes), 1),
                                       max(writes // 5, 100), 1)


def bench_bare(data: Path | None, size: int, rand_count: int,
               record_bytes: float = 0.0) -> dict[str, float]:
    """The broker's own limits for the same work (see the module's docstring); without
    ``data`` only the producer at depth. With ``record_bytes``, also the round trip of
    one record of that size, one in flight at a time."""
    from bench.common import bare_produce, bare_produce_at_depth, scratch_topic
    from infra.kafka import KafkaSettings
    settings = KafkaSettings.resolve()
    out: dict[str, float] = {}
    with scratch_topic(settings, f"bench-bare-{os.getpid()}") as topic:
        if data is not None:
            _, seconds = bare_produce(settings, topic, data)
            out["seq_flush_MBps"] = size / seconds / 1e6
        bpid = broker_pid()
        before = _cpu_now(os.getpid(), bpid)
        out["rand_iops"] = bare_produce_at_depth(settings, topic, 4096, rand_count, 16)
        out |= _per_op(before, os.getpid(), bpid, rand_count, "rand")
        if record_bytes:
            out["round_trip_us"] = round_trip_us(settings, topic, record_bytes, rand_count)
    return out


def measure(home: Path, size: int, rand_count: int) -> dict[str, dict[str, float]]:
    """Every server side by side on the same data, in one run (broker already up)."""
    data = home / "random.img"
    with open(data, "wb") as f:                   # incompressible: lz4 gains nothing
        for _ in range(max(size // (64 * MiB), 1)):
            f.write(os.urandom(min(size, 64 * MiB)))
    # Sync mode's writes wait for the broker, a group at a time (~7,000 IOPS here): half
    # the count keeps its run over a second, where a tenth (0.3 s) moved by +-15% with
    # qemu-img's start and the closing flush.
    sync_count = max(rand_count // 2, 100)
    try:
        results = {"bare produce": bench_bare(data, size, sync_count),
                   # Fewer random writes over TCP: at ~400 IOPS the full count takes a
                   # minute.
                   "qemu-nbd tcp": bench_qemu_nbd(home, data, size, min(rand_count, 2000),
                                                  unix=False),
                   "qemu-nbd unix": bench_qemu_nbd(home, data, size, rand_count, unix=True),
                   "x2x async": bench_x2x(home, data, size, rand_count),
                   "x2x async tcp": bench_x2x(home, data, size, min(rand_count, 2000),
                                              unix=False),
                   "x2x flush-sync": bench_x2x(home, data, size, rand_count, "flush-sync"),
                   "x2x sync": bench_x2x(home, data, size, sync_count, "sync")}
        # The producer at depth again, right after sync mode's random writes, on the
        # broker as they found it (six GiB of copies behind it), not only as it was at
        # the start, when it had written nothing yet.
        results["bare produce, after"] = bench_bare(
            None, size, sync_count, results["x2x sync"]["data_record_bytes"])
        return results
    finally:
        data.unlink(missing_ok=True)


def ratios(results: dict[str, dict[str, float]], mode: str = "x2x async") -> dict[str, float]:
    """x2x (over a unix socket) over the better qemu-nbd figure of each workload."""
    x = results[mode]
    q_seq = max(r["seq_MBps"] for n, r in results.items() if n.startswith("qemu"))
    q_rand = max(r["rand_iops"] for n, r in results.items() if n.startswith("qemu"))
    q_flush = max(r["seq_flush_MBps"] for n, r in results.items() if n.startswith("qemu"))
    return {"seq": x["seq_MBps"] / q_seq, "rand": x["rand_iops"] / q_rand,
            "seq_flush": x["seq_flush_MBps"] / q_flush}


#: The two random-write workloads' names in the figures: qemu-img bench writes one
#: byte value everywhere, which x2x journals as FILL ops without the bytes; fio's nbd
#: engine writes random bytes, as a guest's writes carry.
RAND = "random 4 KiB, one byte repeated"
DATA = "random 4 KiB of random data (fio, nbd engine, depth 16)"
FLOOR = "min(qemu-nbd, bare acks=all produce of 4 KiB records at depth 16, right after it)"
BARE_AT_DEPTH = (f"bare acks=all produce of 4 KiB records, 16 in flight, linger "
                 f"{WAITED_LINGER_MS:g} ms, right after it")


def run(quick: bool, workdir: Path) -> dict:
    """Scenario 2 of ``make bench``: figures against qemu-nbd (the harness's broker)."""
    from bench.common import figure
    missing = [t for t in ("nbdcopy", "qemu-img", "qemu-nbd", "fio") if not shutil.which(t)]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (libnbd-bin, qemu-utils, "
                           f"fio)"}
    size, rand_count = (32 * MiB, 500) if quick else (1024 * MiB, 20000)
    results = measure(Path(workdir), size, rand_count)
    def best(key: str) -> float:
        """qemu-nbd's better figure, of tcp and unix."""
        return max(results["qemu-nbd tcp"][key], results["qemu-nbd unix"][key])
    best_seq, best_rand = best("seq_MBps"), best("rand_iops")
    best_flush, best_data = best("seq_flush_MBps"), best("data_iops")
    figures = []
    for mode in ("x2x async", "x2x flush-sync", "x2x sync"):
        r = results[mode]
        flushed = ("durable on the source" if mode == "x2x async" else "all on the broker")
        figures += [
            figure(f"{mode}: sequential 1 MiB (nbdcopy)", "MB/s", r["seq_MBps"],
                   "qemu-nbd, better of tcp/unix", best_seq, "higher"),
            figure(f"{mode}: sequential 1 MiB (nbdcopy --flush: {flushed})", "MB/s",
                   r["seq_flush_MBps"], "qemu-nbd, better of tcp/unix", best_flush,
                   "higher"),
            figure(f"{mode}: {RAND} (qemu-img bench -d 16)", "IOPS", r["rand_iops"],
                   "qemu-nbd, better of tcp/unix", best_rand, "higher"),
            figure(f"{mode}: {DATA}", "IOPS", r["data_iops"],
                   "qemu-nbd, better of tcp/unix", best_data, "higher")]
    bare = results["bare produce"]
    figures += [
        figure("x2x flush-sync: sequential 1 MiB (nbdcopy --flush: all on the broker) vs "
               "the better peer's floor", "MB/s", results["x2x flush-sync"]["seq_flush_MBps"],
               "min(qemu-nbd, bare acks=all produce of the same bytes)",
               min(best_flush, bare["seq_flush_MBps"]), "higher"),
        # Issue 19's floor for sync's random writes is the bare producer's alone; no NBD
        # server reaches it here when qemu-nbd, with no journal at all, does not.
        figure(f"x2x sync: {RAND} (qemu-img bench -d 16) vs the better peer's floor",
               "IOPS", results["x2x sync"]["rand_iops"],
               FLOOR, min(best_rand, results["bare produce, after"]["rand_iops"]),
               "higher"),
        figure(f"x2x sync: {DATA} vs the better peer's floor", "IOPS",
               results["x2x sync"]["data_iops"],
               FLOOR, min(best_data, results["bare produce, after"]["rand_iops"]),
               "higher"),
        figure(f"x2x sync: {RAND} (qemu-img bench -d 16) vs the broker's own", "IOPS",
               results["x2x sync"]["rand_iops"], BARE_AT_DEPTH,
               results["bare produce, after"]["rand_iops"], "higher"),
        figure(f"x2x sync: {DATA} vs the broker's own", "IOPS",
               results["x2x sync"]["data_iops"], BARE_AT_DEPTH,
               results["bare produce, after"]["rand_iops"], "higher"),
        figure(f"x2x sync: {RAND} (qemu-img bench -d 16) vs the broker's own at the "
               "start", "IOPS", results["x2x sync"]["rand_iops"],
               "the same bare producer before any run, on a broker with nothing to write "
               "back", bare["rand_iops"], "higher")]
    # What bounds sync's random writes: CPU per write, the capturer's and the broker's,
    # against the bare producer's and the broker's per record at the same depth.
    xs, bs = results["x2x sync"], results["bare produce, after"]
    bare_cpu = bs["rand_server_cpu_us_per_op"] + bs["rand_broker_cpu_us_per_op"]
    figures += [figure(
        f"x2x sync: {what}, CPU per write (capturer + broker)", "us",
        xs[f"{key}_server_cpu_us_per_op"] + xs[f"{key}_broker_cpu_us_per_op"],
        "bare producer + broker, per 4 KiB record at depth 16, right after it", bare_cpu,
        "lower") for key, what in (("rand", RAND), ("data", DATA))]
    # Whether any design could reach issue 19's floor for sync on this machine: a server
    # that journals each write before its reply does at least what the cheapest server
    # here spent per write (qemu-nbd, or x2x async, which already hashes and journals it)
    # plus what the bare producer and the broker spent per 4 KiB record. With every CPU
    # busy on that alone (not even the client's, fio's, share), the machine serves at
    # most that many writes a second.
    serving = min(results[name]["data_server_cpu_us_per_op"]
                  for name in ("qemu-nbd tcp", "qemu-nbd unix", "x2x async"))
    cpus = os.cpu_count() or 1
    def busy(r: dict[str, float]) -> float:
        """Share of all CPUs busy while fio wrote: the machine's CPU per write × the rate."""
        return r["data_machine_cpu_us_per_op"] * r["data_iops"] / 1e6 / cpus
    ceiling = cpus * 1e6 / (serving + bare_cpu)
    figures += [
        figure(f"the {cpus} CPUs' ceiling for {DATA}, each journaled before its reply: "
               "the cheapest server's CPU per write + the bare producer's and broker's per "
               "record, every CPU busy on them", "IOPS", ceiling, BARE_AT_DEPTH,
               results["bare produce, after"]["rand_iops"], "higher"),
        figure(f"x2x sync: {DATA} vs that ceiling", "IOPS", xs["data_iops"],
               f"the {cpus} CPUs' ceiling above", ceiling, "higher"),
        # ... and how much of them the writes kept busy (the rest: each side waiting).
        figure(f"x2x sync: {DATA}, share of the {cpus} CPUs busy while they ran", "share",
               busy(xs), "qemu-nbd (unix), the same writes", busy(results["qemu-nbd unix"]),
               "higher")]
    # ... and by time: one record in flight at a time, a record's cycle is its time in
    # flight (the broker's, against a bare record of the same size alone on the wire)
    # and the rest (the acknowledged writes' replies, the client's next writes, their
    # reading and journaling: the capturer's).
    figures += [
        figure(f"x2x sync: {DATA}, a journal record's time in flight (to Kafka and "
               "acknowledged)", "us", xs["data_record_in_flight_us"],
               f"bare producer, one record of the same size "
               f"({xs['data_record_bytes'] / 1024:.0f} KiB) at a time, right after it",
               bs["round_trip_us"], "lower"),
        figure(f"x2x sync: {DATA}, a journal record's whole cycle "
               f"({xs['data_writes_per_record']:.1f} writes each)", "us",
               xs["data_record_cycle_us"], "its time in flight",
               xs["data_record_in_flight_us"], "lower")]
    # ... and whose that time is: a bare record's round trip beside the same writes, from
    # the capturer's process against from another (see round_trips_beside).
    figures.append(figure(
        f"x2x sync: a bare producer's round trip of one record of the same size "
        f"({xs['data_record_bytes'] / 1024:.0f} KiB), from the capturer's own process while "
        "fio writes random data to it as fast as it can",
        "us", xs["beside_own_round_trip_us"], "the same from another process, beside the "
        "same writes", xs["beside_other_round_trip_us"], "lower"))
    # Reads are the same in every mode (they never wait for the journal): async's.
    best_read = best("rand_read_iops")
    figures.append(figure("x2x async: random 4 KiB reads, cached (qemu-img bench -d 16)",
                          "IOPS", results["x2x async"]["rand_read_iops"],
                          "qemu-nbd, better of tcp/unix", best_read, "higher"))
    # Over TCP both ways: what a client on another host gets, short of the wire. Not
    # the random writes: qemu-nbd's delayed-ACK stalls would flatter x2x (see above).
    figures.append(figure("x2x async over TCP: sequential 1 MiB (nbdcopy)", "MB/s",
                          results["x2x async tcp"]["seq_MBps"], "qemu-nbd tcp",
                          results["qemu-nbd tcp"]["seq_MBps"], "higher"))
    # Where the CPU goes during the plain copy (x2x runs in this process).
    x, q = results["x2x async"], results["qemu-nbd unix"]
    figures += [
        figure("x2x async: capturer CPU per GiB copied", "CPU s", x["seq_server_cpu_s_per_GiB"],
               "qemu-nbd (unix)", q["seq_server_cpu_s_per_GiB"], "lower"),
        figure("x2x async: capturer + broker CPU per GiB copied", "CPU s",
               x["seq_server_cpu_s_per_GiB"] + x["seq_broker_cpu_s_per_GiB"],
               "qemu-nbd (unix)", q["seq_server_cpu_s_per_GiB"], "lower")]
    return {"size_bytes": size, "results": results, "figures": figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rand-count", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from bench.common import standalone
    size = args.size_mib * MiB
    with standalone(("nbdcopy", "qemu-img", "qemu-nbd", "fio")) as (home, _):
        results = measure(home, size, args.rand_count)
    r = ratios(results)
    print(f"{'':16}{'seq MB/s':>10}{'seq+flush MB/s':>16}{'rand 4 KiB IOPS':>18}"
          f"{'of random data':>16}")
    for name, res in results.items():
        print(f"{name:16}{res.get('seq_MBps', float('nan')):>10.0f}"
              f"{res['seq_flush_MBps']:>16.0f}{res['rand_iops']:>18.0f}"
              f"{res.get('data_iops', float('nan')):>16.0f}")
    print(f"{'x2x / best qemu':16}{r['seq']:>10.2f}{r['seq_flush']:>16.2f}{r['rand']:>18.2f}")
    print("CPU seconds per GiB during the plain copy (server, broker, nbdcopy):")
    for name, res in results.items():
        if "seq_server_cpu_s_per_GiB" not in res:
            continue
        print(f"  {name:16}{res['seq_server_cpu_s_per_GiB']:>6.2f}"
              f"{res['seq_broker_cpu_s_per_GiB']:>6.2f}{res['seq_nbdcopy_cpu_s_per_GiB']:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "size_bytes": size, "rand_count": args.rand_count, "cpus": os.cpu_count(),
        "machine": platform.platform(), "results": results, "ratio_x2x_over_qemu": r,
        "at": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
