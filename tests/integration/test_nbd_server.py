"""The NBD server against real clients (nbdinfo, qemu-io, qemu-img, nbdcopy) and against a
raw socket sending bad input, serving plain image files through ``infra.volume.Volume``.

No broker is involved: the protocol layer knows nothing of Kafka.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from infra.volume import Volume
from nbd import proto as p
from nbd.server import ClientInfo, NBDServer, Shutdown

MiB = 1 << 20
SIZE = 64 * MiB
HOST = "127.0.0.1"
LOGGER = "x2x.nbd.test"
_PACKAGE = {"nbdinfo": "libnbd-bin", "nbdcopy": "libnbd-bin",
            "qemu-io": "qemu-utils", "qemu-img": "qemu-utils"}


# --- backends -----------------------------------------------------------------------------
@dataclass
class VolumeBackend:
    """An export over ``[offset, offset+size)`` of a Volume; counts what it was asked."""

    vol: Volume
    offset: int = 0
    size: int = -1
    fua_writes: int = 0
    flushes: int = 0
    fail_writes: BaseException | None = None  # raised by pwrite when set
    preads: int = 0        # bytes read from the volume
    zeros: int = 0         # zero calls
    cached: int = 0        # bytes asked to be cached
    fast_zero: bool | None = None   # overrides the volume's answer when set
    #: One volume behind every connection, so a flush covers them all.
    multi_conn: bool = True
    #: Small writes served by the server's reader thread, as the NBD capture's are.
    quick_writes: bool = False
    #: A FLUSH alone in flight served by the reader, as an async capture's is.
    quick_flush: bool = False
    #: A flush waits until this is set (a slow flush, as a sync journal's).
    flush_gate: threading.Event | None = None
    #: What ``flush_local`` leaves for after the reply waits until this is set (an
    #: async capture's journaling of its FLUSH op); it appends "after" to ``order``.
    after_gate: threading.Event | None = None
    order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 0:
            self.size = self.vol.size - self.offset

    def pread(self, offset: int, length: int) -> bytes:
        self.preads += length
        return self.vol.pread(self.offset + offset, length)

    def extents(self, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
        return self.vol.extents(self.offset + offset, length, limit)

    def zero_is_fast(self) -> bool:
        return self.vol.zero_is_fast() if self.fast_zero is None else self.fast_zero

    def cache(self, offset: int, length: int) -> None:
        self.cached += length
        self.vol.cache(self.offset + offset, length)

    def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        if self.fail_writes is not None:
            raise self.fail_writes
        self.vol.pwrite(self.offset + offset, data)
        if fua:
            self.fua_writes += 1
            self.vol.fsync()

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.zeros += 1
        self.vol.zero(self.offset + offset, length)

    def trim(self, offset: int, length: int) -> None:
        # Trimmed data may read back as anything; zeroing (hole punching) is allowed.
        self.vol.zero(self.offset + offset, length)

    def flush(self) -> None:
        if self.flush_gate is not None:
            self.flush_gate.wait(30)
        self.flushes += 1
        self.vol.fsync()

    def flush_local(self) -> Callable[[], None]:
        self.flush()

        def after() -> None:
            if self.after_gate is not None:
                self.after_gate.wait(30)
            self.order.append("after")
        return after


@dataclass
class Served:
    """A running server with its backing file and the records of finished clients."""

    server: NBDServer
    image: Path
    backends: dict[str, VolumeBackend]
    finished: list[ClientInfo] = field(default_factory=list)

    def uri(self, name: str = "disk") -> str:
        return f"nbd://{HOST}:{self.server.port}/{name}"

    def wait_finished(self, count: int, timeout: float = 10.0) -> list[ClientInfo]:
        wait_for(lambda: len(self.finished) >= count, timeout, f"{count} clients to finish")
        return self.finished


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install {_PACKAGE[binary]})")
    return path


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    need(args[0])
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


def serve(tmp_path: Path, exports: dict[str, tuple[int, int]], name: str = "disk.img",
          size: int = SIZE, **server: Any) -> Served:
    """Start a server on a fresh sparse image, one export per (offset, size) slice."""
    image = tmp_path / name
    with open(image, "wb") as f:
        f.truncate(size)
    vol = Volume(str(image), writable=True)
    backends = {n: VolumeBackend(vol, off, sz) for n, (off, sz) in exports.items()}
    served = Served(NBDServer(HOST, 0, dict(backends), log=logging.getLogger(LOGGER),
                              **server), image, backends)
    served.server.on_disconnect = served.finished.append
    served.server.start()
    return served


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Served]:
    """Exports 'disk' (the whole 64 MiB image) and 'small' (its first MiB)."""
    served = serve(tmp_path, {"disk": (0, SIZE), "small": (0, MiB)})
    yield served
    served.server.stop(5)
    assert not served.server.clients


@pytest.fixture
def caplog_nbd(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=LOGGER)
    return caplog


def logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> str:
    """Wait for a server log line containing ``text``, and return it."""
    found: list[str] = []

    def check() -> bool:
        found[:] = [r.getMessage() for r in caplog.records if text in r.getMessage()]
        return bool(found)

    wait_for(check, timeout, f"log line containing {text!r}")
    return found[0]


# --- a raw client, to send what real clients never would ------------------------------------
class RawClient:
    """Speaks NBD by hand over a socket, using the pure protocol module."""

    def __init__(self, port: int, flags: int | None = p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.greeting = p.parse_server_greeting(self.recv(p.SERVER_GREETING_SIZE))
        if flags is not None:
            self.sock.sendall(p.encode_client_flags(flags))

    @property
    def local(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def recv(self, size: int) -> bytes:
        buf = bytearray()
        while len(buf) < size:
            chunk = self.sock.recv(size - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {size} bytes")
            buf += chunk
        return bytes(buf)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect (reply type, data) until ACK or an error reply."""
        self.sock.sendall(p.encode_option_request(option, data))
        replies = []
        while True:
            head = p.parse_option_reply_header(self.recv(p.OPTION_REPLY_HEADER_SIZE))
            assert head.option == option
            replies.append((head.reply, self.recv(head.length)))
            if head.reply == p.Reply.ACK or head.reply & (1 << 31):
                return replies

    def go(self, name: str = "disk") -> p.ExportInfo:
        replies = self.option(p.Option.GO, p.encode_info_request(name))
        assert replies[-1][0] == p.Reply.ACK, replies
        return next(i for r, d in replies if r == p.Reply.INFO
                    and isinstance(i := p.parse_info_reply(d), p.ExportInfo))

    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", cookie: int = 0xC0FFEE) -> tuple[int, bytes]:
        """One request; returns (error, read data)."""
        self.sock.sendall(p.encode_request(p.Request(flags, cmd, cookie, offset, length)) + payload)
        reply = p.parse_simple_reply(self.recv(p.SIMPLE_REPLY_SIZE))
        assert reply.cookie == cookie
        data = self.recv(length) if cmd == p.Cmd.READ and reply.error == 0 else b""
        return reply.error, data

    def negotiate(self, name: str = "disk", contexts: tuple[str, ...] = ("base:allocation",)
                  ) -> p.ExportInfo:
        """Structured replies, then the metadata contexts, then GO."""
        assert self.option(p.Option.STRUCTURED_REPLY) == [(p.Reply.ACK, b"")]
        if contexts:
            got = self.option(p.Option.SET_META_CONTEXT,
                              p.encode_meta_context_request(name, contexts))
            assert got[-1][0] == p.Reply.ACK, got
        return self.go(name)

    def reply(self, cookie: int) -> tuple[int, list[Any]]:
        """One whole reply, simple or structured: (error, structured chunks). A simple
        reply gives no chunks (a simple READ reply is not read here)."""
        magic = int.from_bytes(self.recv(4), "big")
        if magic == p.SIMPLE_REPLY_MAGIC:
            reply = p.parse_simple_reply(magic.to_bytes(4, "big") + self.recv(12))
            assert reply.cookie == cookie
            return reply.error, []
        chunks, error = [], 0
        while True:
            head = p.parse_chunk_header(magic.to_bytes(4, "big") + self.recv(16))
            assert head.cookie == cookie
            chunk = p.parse_chunk_payload(head.type, self.recv(head.length))
            if isinstance(chunk, p.ErrorChunk):
                error = chunk.error
            chunks.append(chunk)
            if head.flags & p.REPLY_FLAG_DONE:
                return error, chunks
            magic = int.from_bytes(self.recv(4), "big")

    def structured(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                   payload: bytes = b"", cookie: int = 0xC0FFEE) -> tuple[int, list[Any]]:
        """One request on a connection that negotiated structured replies."""
        self.sock.sendall(p.encode_request(p.Request(flags, cmd, cookie, offset, length)) + payload)
        return self.reply(cookie)

    def assert_closed_by_server(self) -> None:
        """The server ends the connection: EOF (or reset) with nothing more to read."""
        try:
            assert self.sock.recv(1 << 16) == b""
        except ConnectionResetError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(srv: Served) -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def make(**kw: object) -> RawClient:
        c = RawClient(srv.server.port, **kw)  # type: ignore[arg-type]
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


def image_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_still_serving(srv: Served) -> None:
    out = run("nbdinfo", "--size", srv.uri())
    assert int(out.stdout) == SIZE


# --- real clients -------------------------------------------------------------------------
def test_nbdinfo_sees_size_flags_and_block_sizes(srv: Served) -> None:
    info = json.loads(run("nbdinfo", "--json", srv.uri()).stdout)
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    (export,) = info["exports"]
    assert export["export-name"] == "disk" and export["export-size"] == SIZE
    assert export["can_flush"] and export["can_fua"] and export["can_trim"] and export["can_zero"]
    assert export["can_multi_conn"] and export["can_fast_zero"] and export["can_cache"]
    assert export["can_df"] and export["contexts"] == ["base:allocation"]
    assert not export["is_read_only"]
    assert (export["block_size_minimum"], export["block_size_preferred"],
            export["block_size_maximum"]) == (1, 4096, 32 * MiB)


def test_nbdinfo_lists_every_export(srv: Served) -> None:
    info = json.loads(run("nbdinfo", "--list", "--json", srv.uri("")).stdout)
    sizes = {e["export-name"]: e["export-size"] for e in info["exports"]}
    assert sizes == {"disk": SIZE, "small": MiB}


def test_unknown_export_is_refused_and_logged(srv: Served, caplog_nbd: pytest.LogCaptureFixture) -> None:
    out = run("nbdinfo", srv.uri("nope"), check=False)
    assert out.returncode != 0 and "nope" in out.stderr
    assert "'nope'" in logged(caplog_nbd, "unknown export")
    # With two exports an empty name is ambiguous, so it is unknown too.
    assert run("nbdinfo", "--size", srv.uri(""), check=False).returncode != 0


def test_empty_name_is_the_default_export_when_there_is_one(tmp_path: Path) -> None:
    served = serve(tmp_path, {"only": (0, 2 * MiB)}, size=2 * MiB)
    try:
        assert int(run("nbdinfo", "--size", f"nbd://{HOST}:{served.server.port}").stdout) == 2 * MiB
        assert served.wait_finished(1)[0].export == "only"
    finally:
        served.server.stop(5)


def test_qemu_io_write_read_zero_discard_flush(srv: Served) -> None:
    # Writeback cache, else qemu-io sends every write with FUA (writethrough default).
    out = run("qemu-io", "-f", "raw", "-t", "writeback",
              "-c", "write -P 0xab 0 1M",
              "-c", "read -P 0xab 0 1M",
              "-c", "write -f -P 0xcd 1M 64k",      # FUA
              "-c", "write -P 0x11 3M 1M",
              "-c", "write -z 3M 512k",              # WRITE_ZEROES with NO_HOLE
              "-c", "read -P 0 3M 512k",
              "-c", "read -P 0x11 3584k 512k",
              "-c", "write -P 0x22 5M 1M",
              "-c", "discard 5M 1M",                 # TRIM
              "-c", "flush",
              "-c", "read -P 0xab 512 100",          # unaligned read
              srv.uri())
    assert "Pattern verification failed" not in out.stdout + out.stderr
    img = srv.image
    assert image_bytes(img, 0, MiB) == b"\xab" * MiB
    assert image_bytes(img, MiB, 64 * 1024) == b"\xcd" * 64 * 1024
    assert image_bytes(img, 3 * MiB, MiB) == bytes(MiB // 2) + b"\x11" * (MiB // 2)
    assert image_bytes(img, 5 * MiB, MiB) == bytes(MiB)
    disk = srv.backends["disk"]
    assert disk.fua_writes == 1 and disk.flushes >= 1
    (rec,) = srv.wait_finished(1)
    assert rec.export == "disk" and rec.bytes_written == MiB + 64 * 1024 + MiB + MiB
    assert rec.bytes_read == MiB + MiB // 2 + MiB // 2 + 100 and rec.requests >= 11


def test_qemu_img_convert_random_image_is_byte_exact(srv: Served, tmp_path: Path) -> None:
    src = tmp_path / "random.img"
    src.write_bytes(os.urandom(SIZE))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), srv.uri())
    assert srv.image.read_bytes() == src.read_bytes()


def test_nbdcopy_both_directions(srv: Served, tmp_path: Path) -> None:
    src = tmp_path / "random.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), srv.uri())
    assert srv.image.read_bytes() == src.read_bytes()
    back = tmp_path / "back.img"
    run("nbdcopy", srv.uri(), str(back))
    assert back.read_bytes() == src.read_bytes()


def test_two_nbdcopy_into_different_regions_concurrently(tmp_path: Path) -> None:
    need("nbdcopy")
    half = SIZE // 2
    served = serve(tmp_path, {"low": (0, half), "high": (half, half)})
    try:
        parts = {}
        procs = []
        for name in ("low", "high"):
            parts[name] = tmp_path / f"{name}.img"
            parts[name].write_bytes(os.urandom(half))
            procs.append(subprocess.Popen(["nbdcopy", str(parts[name]), served.uri(name)]))
        assert [proc.wait(60) for proc in procs] == [0, 0]
        assert served.image.read_bytes() == parts["low"].read_bytes() + parts["high"].read_bytes()
        # Multi-conn: nbdcopy may open several connections per export.
        def written(name: str) -> int:
            return sum(r.bytes_written for r in served.finished if r.export == name)
        wait_for(lambda: written("low") == half and written("high") == half, 10,
                 "every connection of both copies to finish")
        assert {r.export for r in served.finished} == {"high", "low"}
    finally:
        served.server.stop(5)


def test_connected_client_is_listed_while_others_come_and_go(
        srv: Served, raw: Callable[..., RawClient]) -> None:
    held = raw()
    held.go("small")
    assert held.request(p.Cmd.WRITE, 0, 4096, payload=b"\x5a" * 4096)[0] == 0
    run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 4k", srv.uri())
    assert int(run("nbdinfo", "--size", srv.uri("small")).stdout) == MiB
    (rec,) = [c for c in srv.server.clients if c.peer == held.local]
    assert rec.export == "small" and rec.requests == 1 and rec.bytes_written == 4096
    assert rec.connected_at <= time.time()
    assert held.request(p.Cmd.READ, 0, 4096) == (0, b"\x5a" * 4096)


# --- option haggling by hand ----------------------------------------------------------------
def test_export_name_option_with_and_without_zeroes(raw: Callable[..., RawClient]) -> None:
    for flags, reply_len in ((p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES, 10),
                             (p.FLAG_C_FIXED_NEWSTYLE, 134)):
        c = raw(flags=flags)
        assert c.greeting.flags == p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES
        c.sock.sendall(p.encode_option_request(p.Option.EXPORT_NAME, b"small"))
        reply = c.recv(reply_len)
        info = p.parse_export_name_reply(reply[:10])
        assert info.size == MiB and info.flags & p.FLAG_SEND_WRITE_ZEROES
        assert reply[10:] == bytes(reply_len - 10)
        assert c.request(p.Cmd.READ, 0, 512) == (0, bytes(512))  # in sync after padding


def test_options_answered_per_spec_then_go_still_works(raw: Callable[..., RawClient]) -> None:
    c = raw()
    assert c.option(0x1234, b"junk") == [(p.Reply.ERR_UNSUP, b"")]
    assert c.option(p.Option.EXTENDED_HEADERS) == [(p.Reply.ERR_UNSUP, b"")]   # not offered
    assert c.option(p.Option.STARTTLS) == [(p.Reply.ERR_POLICY, b"")]
    assert c.option(p.Option.INFO, p.encode_info_request("nope")) == [(p.Reply.ERR_UNKNOWN, b"")]
    assert c.option(p.Option.INFO, b"\x00\x00\x00\x09ab") == [(p.Reply.ERR_INVALID, b"")]
    listed = c.option(p.Option.LIST)
    assert [p.parse_rep_server(d)[0] for r, d in listed if r == p.Reply.SERVER] == ["disk", "small"]
    info = [p.parse_info_reply(d) for r, d in c.option(p.Option.INFO, p.encode_info_request("small"))
            if r == p.Reply.INFO]
    assert p.ExportInfo(MiB, info[0].flags) in info and p.BLOCK_SIZE in info  # type: ignore[union-attr]
    assert c.go("disk").size == SIZE
    assert c.request(p.Cmd.FLUSH) == (0, b"")


def test_abort_gets_ack_then_close(raw: Callable[..., RawClient]) -> None:
    c = raw()
    assert c.option(p.Option.ABORT) == [(p.Reply.ACK, b"")]
    c.assert_closed_by_server()


@pytest.mark.parametrize("flags, send, log_text", [
    (None, b"\xde\xad\xbe\xef" * 8, "bad client flags"),                  # garbage
    (None, p.encode_client_flags(0x81), "unknown client flags"),
    (None, p.encode_client_flags(p.FLAG_C_NO_ZEROES), "fixed newstyle"),
    (p.FLAG_C_FIXED_NEWSTYLE, b"NOTMAGIC" + bytes(8), "bad option magic"),
    (p.FLAG_C_FIXED_NEWSTYLE, p.encode_option_request(p.Option.GO)[:12] + b"\x00\x10\x00\x01",
     "exceeds"),                                                            # 64 KiB + 1
    (p.FLAG_C_FIXED_NEWSTYLE, p.encode_option_request(p.Option.EXPORT_NAME, b"nope"),
     "unknown export 'nope'"),                              # EXPORT_NAME has no error reply
], ids=["garbage", "unknown-flags", "not-fixed", "option-magic", "option-too-big",
        "export-name-unknown"])
def test_bad_handshake_closes_that_client_only(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture,
        flags: int | None, send: bytes, log_text: str) -> None:
    c = raw(flags=flags)
    c.sock.sendall(send)
    c.assert_closed_by_server()
    assert c.local in logged(caplog_nbd, log_text)
    assert_still_serving(srv)


def test_truncated_handshake_is_logged_and_server_carries_on(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture) -> None:
    c = raw(flags=None)
    c.sock.sendall(b"\x00\x00")  # half of the client flags
    peer = c.local
    c.close()
    assert peer in logged(caplog_nbd, "vanished")
    assert_still_serving(srv)


# --- transmission by hand -------------------------------------------------------------------
def test_wrong_request_magic_closes(raw: Callable[..., RawClient],
                                    caplog_nbd: pytest.LogCaptureFixture) -> None:
    c = raw()
    c.go()
    c.sock.sendall(b"\x21\xe4\x1c\x71" + bytes(p.REQUEST_SIZE - 4))  # extended header, never agreed
    c.assert_closed_by_server()
    assert c.local in logged(caplog_nbd, "bad request magic")


def test_invalid_requests_get_errors_and_the_stream_stays_in_sync(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture) -> None:
    c = raw()
    c.go("small")
    assert c.request(0x77, 0, 512)[0] == p.Err.EINVAL                      # unknown command
    assert c.request(p.Cmd.BLOCK_STATUS, 0, 512)[0] == p.Err.EINVAL        # never advertised
    assert c.request(p.Cmd.READ, MiB - 512, 1024)[0] == p.Err.EINVAL       # past the end
    assert c.request(p.Cmd.READ, 2**64 - 1, 1)[0] == p.Err.EINVAL          # offset overflow
    assert c.request(p.Cmd.READ, 0, 32 * MiB + 1)[0] == p.Err.EINVAL       # too long
    assert c.request(p.Cmd.TRIM, MiB, 1)[0] == p.Err.EINVAL
    assert c.request(p.Cmd.WRITE_ZEROES, MiB - 1, 2)[0] == p.Err.ENOSPC
    # A write past the end still carries its payload, which must be skipped, not applied.
    assert c.request(p.Cmd.WRITE, MiB - 512, 1024, payload=b"\xee" * 1024)[0] == p.Err.ENOSPC
    assert c.request(p.Cmd.WRITE, 0, 512, flags=p.CMD_FLAG_NO_HOLE, payload=b"\xee" * 512)[0] \
        == p.Err.EINVAL
    assert b"\xee" not in image_bytes(srv.image, 0, 2 * MiB)
    assert c.request(p.Cmd.READ, MiB - 512, 512) == (0, bytes(512))        # still in sync
    assert c.local in logged(caplog_nbd, "unknown command 119")
    assert logged(caplog_nbd, "NBD_CMD_WRITE_ZEROES").endswith("refused with ENOSPC")


@pytest.mark.parametrize("quick", [False, True], ids=["workers", "reader"])
def test_a_pipelined_batch_is_answered_whole_and_in_sync(
        srv: Served, raw: Callable[..., RawClient], quick: bool) -> None:
    """A client sends 48 requests in one go, as a queue-depth client does, then waits:
    every one is answered once (replies the reader held back while more requests were
    buffered go out before it waits), a refused write in the middle has its payload
    skipped, and the stream stays in sync."""
    srv.backends["disk"].quick_writes = quick
    c = raw()
    c.go()
    blocks = {i: os.urandom(4096) for i in range(46)}
    batch = [p.encode_request(p.Request(0, p.Cmd.WRITE, i, i * 8192, 4096)) + data
             for i, data in blocks.items()]
    batch.insert(20, p.encode_request(p.Request(0, p.Cmd.WRITE, 1000, SIZE - 512, 4096))
                 + b"\xee" * 4096)                        # past the end: refused
    batch.append(p.encode_request(p.Request(0, p.Cmd.READ, 1001, 45 * 8192, 4096)))
    c.sock.sendall(b"".join(batch))
    answers: dict[int, int] = {}
    for _ in range(len(batch)):
        reply = p.parse_simple_reply(c.recv(p.SIMPLE_REPLY_SIZE))
        assert reply.cookie not in answers, f"cookie {reply.cookie} answered twice"
        answers[reply.cookie] = reply.error
        if reply.cookie == 1001:
            # In flight with the writes: NBD orders nothing between them, so only its
            # length is known here; the writes are checked once answered.
            assert len(c.recv(4096)) == 4096
    assert answers == {**{i: 0 for i in blocks}, 1000: p.Err.ENOSPC, 1001: 0}
    for i, data in blocks.items():
        assert image_bytes(srv.image, i * 8192, 8192) == data + bytes(4096)
    assert b"\xee" not in image_bytes(srv.image, SIZE - MiB, MiB)
    assert c.request(p.Cmd.READ, 45 * 8192, 4096) == (0, blocks[45])    # still in sync


@pytest.mark.parametrize("fast", [True, False], ids=["punches", "writes-zeros"])
def test_a_quick_backend_zeroes_on_the_reader_only_where_zeroing_punches_a_hole(
        srv: Served, raw: Callable[..., RawClient], fast: bool) -> None:
    """A quick-writing backend (the async capture) has WRITE_ZEROES served by the reader
    itself, as its small writes are, while zeroing punches holes; FUA, or a zeroing that
    writes zeros, goes to a worker. Either way the range reads as zeros, and a range past
    the end is refused."""
    disk = srv.backends["disk"]
    disk.quick_writes, disk.fast_zero = True, fast
    calls: list[tuple[str, bool]] = []
    real_zero = disk.zero

    def zero(offset: int, length: int, fua: bool) -> None:
        calls.append((threading.current_thread().name, fua))
        real_zero(offset, length, fua)
    disk.zero = zero                    # type: ignore[method-assign]
    c = raw()
    c.go()
    assert c.request(p.Cmd.WRITE, 0, 3 * 4096, payload=b"\x5a" * 3 * 4096) == (0, b"")
    assert c.request(p.Cmd.WRITE_ZEROES, 4096, 4096) == (0, b"")
    assert c.request(p.Cmd.WRITE_ZEROES, 8192, 4096, flags=p.CMD_FLAG_NO_HOLE) == (0, b"")
    assert c.request(p.Cmd.WRITE_ZEROES, 0, 4096, flags=p.CMD_FLAG_FUA) == (0, b"")
    assert c.request(p.Cmd.WRITE_ZEROES, SIZE - 512, 4096)[0] == p.Err.ENOSPC
    assert image_bytes(srv.image, 0, 3 * 4096) == bytes(3 * 4096)
    on_reader = [name.startswith("nbd-client-") for name, _ in calls]
    assert on_reader == [fast, fast, False], calls
    assert [fua for _, fua in calls] == [False, False, True]
    assert c.request(p.Cmd.READ, 0, 4096) == (0, bytes(4096))          # still in sync


@pytest.mark.parametrize("quick_flush", [False, True], ids=["worker-flush", "reader-flush"])
def test_a_held_reply_does_not_wait_behind_a_slow_request(
        srv: Served, raw: Callable[..., RawClient], quick_flush: bool) -> None:
    """A write the reader served, held back while a FLUSH was buffered behind it, is
    answered while that FLUSH is still running (on a worker, or on the reader itself
    when the FLUSH is all the connection has in flight), not after it."""
    backend = srv.backends["disk"]
    backend.quick_writes, backend.flush_gate = True, threading.Event()
    backend.quick_flush = quick_flush
    c = raw()
    c.go()
    c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.WRITE, 1, 0, 4096)) + b"\x5a" * 4096
                   + p.encode_request(p.Request(0, p.Cmd.FLUSH, 2, 0, 0)))
    c.sock.settimeout(5)
    try:
        assert p.parse_simple_reply(c.recv(p.SIMPLE_REPLY_SIZE)) == p.SimpleReply(0, 1)
    finally:
        backend.flush_gate.set()
    assert p.parse_simple_reply(c.recv(p.SIMPLE_REPLY_SIZE)) == p.SimpleReply(0, 2)


def test_a_quick_flush_is_answered_before_its_rest_runs_and_the_next_request_after(
        srv: Served, raw: Callable[..., RawClient]) -> None:
    """An async capture's FLUSH: the reply once the disk has the writes, the journal's
    part after it; the connection's next request is served only once that part is done,
    so what the client writes after its FLUSH reaches the journal behind the FLUSH op."""
    backend = srv.backends["disk"]
    backend.quick_writes, backend.quick_flush = True, True
    backend.after_gate = threading.Event()
    real_pwrite = backend.pwrite

    def pwrite(offset: int, data: memoryview, fua: bool) -> None:
        backend.order.append("write")
        real_pwrite(offset, data, fua)
    backend.pwrite = pwrite             # type: ignore[method-assign]
    c = raw()
    c.go()
    c.sock.settimeout(5)
    try:
        c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.FLUSH, 1, 0, 0)))
        assert p.parse_simple_reply(c.recv(p.SIMPLE_REPLY_SIZE)) == p.SimpleReply(0, 1)
        assert backend.flushes == 1 and backend.order == []     # answered, rest pending
        c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.WRITE, 2, 0, 4096))
                       + b"\x5a" * 4096)
        time.sleep(0.3)
        assert backend.order == []          # the write waits behind the FLUSH's rest
    finally:
        backend.after_gate.set()
    assert p.parse_simple_reply(c.recv(p.SIMPLE_REPLY_SIZE)) == p.SimpleReply(0, 2)
    assert backend.order == ["after", "write"]
    assert image_bytes(srv.image, 0, 4096) == b"\x5a" * 4096


@pytest.mark.parametrize("quick", [False, True], ids=["workers", "reader"])
def test_oversized_write_closes_without_touching_the_volume(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture,
        quick: bool) -> None:
    """A WRITE past the largest payload, though inside the export, ends the connection
    before its payload is read, whether or not the reader would serve it itself."""
    srv.backends["disk"].quick_writes = quick
    c = raw()
    c.go()
    c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.WRITE, 1, 0, 32 * MiB + 1)) + b"\xee" * 4096)
    c.assert_closed_by_server()
    assert c.local in logged(caplog_nbd, "exceeds")
    assert image_bytes(srv.image, 0, 4096) == bytes(4096)
    assert_still_serving(srv)


def test_client_vanishing_mid_write_applies_nothing(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture) -> None:
    c = raw()
    c.go()
    c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.WRITE, 1, 8 * MiB, MiB)) + b"\xff" * (MiB // 2))
    peer = c.local
    c.close()
    assert peer in logged(caplog_nbd, "vanished mid-message")
    (rec,) = srv.wait_finished(1)
    assert rec.bytes_written == 0
    assert image_bytes(srv.image, 8 * MiB, MiB) == bytes(MiB)
    run("qemu-io", "-f", "raw", "-c", "write -P 0x42 8M 4k", "-c", "read -P 0x42 8M 4k", srv.uri())
    assert image_bytes(srv.image, 8 * MiB, 8192) == b"\x42" * 4096 + bytes(4096)


def test_disc_closes_cleanly(srv: Served, raw: Callable[..., RawClient],
                             caplog_nbd: pytest.LogCaptureFixture) -> None:
    c = raw()
    c.go()
    c.sock.sendall(p.encode_request(p.Request(0, p.Cmd.DISC, 1, 0, 0)))
    c.assert_closed_by_server()
    assert c.local in logged(caplog_nbd, "NBD_CMD_DISC")


@pytest.mark.parametrize("quick", [False, True], ids=["workers", "reader"])
def test_backend_errno_is_mapped_and_shutdown_disconnects(
        srv: Served, raw: Callable[..., RawClient], caplog_nbd: pytest.LogCaptureFixture,
        quick: bool) -> None:
    """A failed write gets its own error whoever served it (a worker, or the reader's
    quick write); a backend bug is EIO and the connection goes on."""
    c = raw()
    c.go()
    disk = srv.backends["disk"]
    disk.quick_writes = quick
    disk.fail_writes = OSError(errno.EROFS, "read-only")
    assert c.request(p.Cmd.WRITE, 0, 512, payload=bytes(512))[0] == p.Err.EPERM
    disk.fail_writes = OSError(errno.ENOSPC, "full")
    assert c.request(p.Cmd.WRITE, 0, 512, payload=bytes(512))[0] == p.Err.ENOSPC
    disk.fail_writes = OSError(errno.EBADMSG, "odd")
    assert c.request(p.Cmd.WRITE, 0, 512, payload=bytes(512))[0] == p.Err.EIO
    disk.fail_writes = ZeroDivisionError("a backend bug")
    assert c.request(p.Cmd.WRITE, 0, 512, payload=bytes(512))[0] == p.Err.EIO
    assert logged(caplog_nbd, "a backend bug").endswith("-> EIO")
    disk.fail_writes = None
    assert c.request(p.Cmd.WRITE, 0, 512, payload=b"\x42" * 512) == (0, b"")
    assert c.request(p.Cmd.READ, 0, 512) == (0, b"\x42" * 512)  # still in sync
    disk.fail_writes = Shutdown("failing over")
    assert c.request(p.Cmd.WRITE, 0, 512, payload=bytes(512))[0] == p.Err.ESHUTDOWN
    c.assert_closed_by_server()
    assert "failing over" in logged(caplog_nbd, "shutting down")


def test_stop_disconnects_clients_and_joins_threads(tmp_path: Path) -> None:
    served = serve(tmp_path, {"disk": (0, MiB)}, size=MiB)
    clients = [RawClient(served.server.port) for _ in range(3)]
    for c in clients[:2]:
        c.go()
    wait_for(lambda: len(served.server.clients) == 3, what="3 connected clients")
    before = threading.active_count()
    served.server.stop(5)
    for c in clients:
        c.assert_closed_by_server()
        c.close()
    assert served.server.clients == [] and len(served.finished) == 3
    assert threading.active_count() <= before - 4  # 3 client threads + the accept thread
    with pytest.raises(OSError):
        socket.create_connection((HOST, served.server.port), timeout=1).close()


# --- holding the server before authentication ---------------------------------------------
def _idle(port: int) -> socket.socket:
    """A connection that says nothing."""
    return socket.create_connection((HOST, port), timeout=10)


def test_a_client_silent_in_the_handshake_is_closed_after_the_timeout(
        tmp_path: Path, caplog_nbd: pytest.LogCaptureFixture) -> None:
    served = serve(tmp_path, {"disk": (0, MiB)}, size=MiB, handshake_timeout=0.5)
    try:
        s = _idle(served.server.port)
        s.recv(p.SERVER_GREETING_SIZE)             # the greeting, then silence
        assert s.recv(1) == b""                    # closed by the server, not by us
        line = logged(caplog_nbd, "no complete handshake within")
        assert "closing" in line
        s.close()
        # Once an export is chosen the timeout no longer applies: requests may pause.
        c = RawClient(served.server.port)
        c.go("disk")
        time.sleep(1.0)
        assert c.request(p.Cmd.FLUSH) == (0, b"")
        c.close()
    finally:
        served.server.stop(5)


def test_a_connection_flood_leaves_legitimate_clients_served(
        tmp_path: Path, caplog_nbd: pytest.LogCaptureFixture) -> None:
    """40 silent connections against a cap of 8: the server holds at most 8, refuses
    the rest with a log line, drops the silent ones at the handshake timeout, and
    nbdinfo (retried as a user would) gets its answer."""
    need("nbdinfo")
    served = serve(tmp_path, {"disk": (0, MiB)}, size=MiB, handshake_timeout=1.0,
                   max_connections=8)
    flood = [_idle(served.server.port) for _ in range(40)]
    try:
        wait_for(lambda: len(served.server.clients) >= 8, 5, "8 held connections")
        assert len(served.server.clients) <= 8
        assert "the cap" in logged(caplog_nbd, "connections already")
        deadline = time.monotonic() + 20
        while True:
            got = run("nbdinfo", "--json", served.uri("disk"), check=False)
            if got.returncode == 0:
                break
            assert time.monotonic() < deadline, got.stderr
            time.sleep(0.3)
        assert json.loads(got.stdout)["exports"][0]["export-size"] == MiB
        assert len(served.server.clients) <= 8
    finally:
        for s in flood:
            s.close()
        served.server.stop(5)


def test_trim_with_fua_is_durable_before_the_reply(srv: Served,
                                                   raw: Callable[..., RawClient]) -> None:
    c = raw()
    c.go("disk")
    before = srv.backends["disk"].flushes
    assert c.request(p.Cmd.TRIM, 0, 65536, flags=p.CMD_FLAG_FUA) == (0, b"")
    assert srv.backends["disk"].flushes == before + 1
    assert c.request(p.Cmd.TRIM, 65536, 65536) == (0, b"")     # without FUA: no flush
    assert srv.backends["disk"].flushes == before + 1


# --- structured replies, block status, fast zero, cache, multi-conn ---------------------------
#: Where the sparse image holds data: (offset, length); everything else is a hole.
DATA = [(MiB, MiB), (10 * MiB, 64 * 1024), (40 * MiB, 8 * MiB)]
DATA_BYTES = sum(n for _, n in DATA)


def make_sparse(srv: Served) -> None:
    """Random data at DATA in the served image, holes elsewhere."""
    with open(srv.image, "r+b") as f:
        for off, n in DATA:
            f.seek(off)
            f.write(os.urandom(n))


def holes_and_data(size: int = SIZE) -> list[tuple[int, int, bool]]:
    """DATA as the (offset, length, hole) runs that cover the whole image."""
    runs, pos = [], 0
    for off, n in DATA:
        if off > pos:
            runs.append((pos, off - pos, True))
        runs.append((off, n, False))
        pos = off + n
    return runs + ([(pos, size - pos, True)] if pos < size else [])


def test_nbdinfo_map_shows_holes_and_data(srv: Served) -> None:
    make_sparse(srv)
    out = json.loads(run("nbdinfo", "--map", "--json", srv.uri()).stdout)
    got = [(e["offset"], e["length"], e["type"] == 3) for e in out]
    assert got == holes_and_data()
    assert all(e["type"] in (0, 3) for e in out)          # data 0, hole|zero 3
    totals = run("nbdinfo", "--map", "--totals", srv.uri()).stdout
    assert f"{DATA_BYTES} " in totals and "data" in totals and "hole,zero" in totals


def test_nbdcopy_from_the_export_reads_only_the_data(srv: Served, tmp_path: Path) -> None:
    make_sparse(srv)
    disk = srv.backends["disk"]
    out = tmp_path / "copy.img"
    run("nbdcopy", srv.uri(), str(out))
    assert out.read_bytes() == srv.image.read_bytes()
    assert disk.preads == DATA_BYTES              # the holes were never read
    records = srv.wait_finished(1)
    assert sum(r.bytes_read - r.bytes_holes for r in records) == DATA_BYTES


def test_qemu_img_convert_from_the_export_makes_a_sparse_file(srv: Served,
                                                              tmp_path: Path) -> None:
    make_sparse(srv)
    out = tmp_path / "convert.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri(), str(out))
    assert out.read_bytes() == srv.image.read_bytes()
    allocated = os.stat(out).st_blocks * 512
    assert DATA_BYTES <= allocated <= DATA_BYTES + MiB, allocated
    assert srv.backends["disk"].preads == DATA_BYTES


def test_structured_read_sends_holes_as_holes_and_df_as_one_chunk(
        srv: Served, raw: Callable[..., RawClient]) -> None:
    make_sparse(srv)
    c = raw()
    info = c.negotiate()
    assert info.flags & p.FLAG_SEND_DF and info.flags & p.FLAG_CAN_MULTI_CONN
    # [MiB - 4k, 2 MiB + 4k): a hole, the data, a hole.
    err, chunks = c.structured(p.Cmd.READ, MiB - 4096, MiB + 8192)
    assert err == 0
    assert chunks[0] == p.OffsetHole(MiB - 4096, 4096)
    assert chunks[1] == p.OffsetData(MiB, image_bytes(srv.image, MiB, MiB))
    assert chunks[2] == p.OffsetHole(2 * MiB, 4096) and len(chunks) == 3
    # Don't fragment: one data chunk, zeros included.
    err, (chunk,) = c.structured(p.Cmd.READ, MiB - 4096, 8192, flags=p.CMD_FLAG_DF)
    assert err == 0 and chunk == p.OffsetData(MiB - 4096, image_bytes(srv.image, MiB - 4096, 8192))
    assert c.structured(p.Cmd.READ, 0, 0) == (0, [None])            # NONE chunk
    # A refused READ is an ERROR chunk that says why (a simple reply is not allowed).
    err, (chunk,) = c.structured(p.Cmd.READ, SIZE - 512, 1024)
    assert err == p.Err.EINVAL and "past the end" in chunk.message
    err, (chunk,) = c.structured(p.Cmd.READ, 0, 512, flags=p.CMD_FLAG_REQ_ONE)
    assert err == p.Err.EINVAL and "not valid on NBD_CMD_READ" in chunk.message
    assert c.structured(p.Cmd.FLUSH) == (0, [])                      # simple OK


@pytest.mark.parametrize("in_cache", [True, False], ids=["cached", "on-disk"])
def test_a_read_the_page_cache_holds_is_served_by_the_reader_the_rest_by_a_worker(
        srv: Served, raw: Callable[..., RawClient], in_cache: bool) -> None:
    """A backend that can tell (``pread_cached``, the NBD capture's) has a small READ the
    page cache holds served by the reader itself; one that would wait for the disk goes
    to a worker. Either way the reply is the same: simple, or structured with its
    holes."""
    make_sparse(srv)
    disk = srv.backends["disk"]
    real_pread = disk.pread
    reads: list[tuple[str, bool]] = []      # (how, on the reader thread)

    def on_reader() -> bool:
        return threading.current_thread().name.startswith("nbd-client-")

    def pread(offset: int, length: int) -> bytes:
        reads.append(("pread", on_reader()))
        return real_pread(offset, length)

    def pread_cached(offset: int, length: int) -> bytes | None:
        reads.append(("cached", on_reader()))
        return real_pread(offset, length) if in_cache else None
    disk.pread = pread                          # type: ignore[method-assign]
    disk.pread_cached = pread_cached            # type: ignore[attr-defined]
    served = [("cached", True)] if in_cache else [("cached", True), ("pread", False)]
    simple = raw()
    simple.go()
    assert simple.request(p.Cmd.READ, MiB, 8192) == (0, image_bytes(srv.image, MiB, 8192))
    assert reads == served
    reads.clear()
    structured = raw()
    structured.negotiate()
    err, chunks = structured.structured(p.Cmd.READ, MiB - 4096, 8192)
    assert err == 0 and chunks == [p.OffsetHole(MiB - 4096, 4096),
                                   p.OffsetData(MiB, image_bytes(srv.image, MiB, 4096))]
    assert reads == served
    reads.clear()
    # Longer than the reader serves: a worker's, cached or not.
    assert simple.request(p.Cmd.READ, 0, 512 * 1024)[0] == 0
    assert reads == [("pread", False)]


def test_block_status_by_hand(srv: Served, raw: Callable[..., RawClient]) -> None:
    make_sparse(srv)
    c = raw()
    c.negotiate()
    err, (chunk,) = c.structured(p.Cmd.BLOCK_STATUS, 0, 12 * MiB)
    hole = p.STATE_HOLE | p.STATE_ZERO
    assert err == 0 and chunk == p.BlockStatus(p.BASE_ALLOCATION_ID, (
        (MiB, hole), (MiB, 0), (8 * MiB, hole), (64 * 1024, 0), (2 * MiB - 64 * 1024, hole)))
    err, (chunk,) = c.structured(p.Cmd.BLOCK_STATUS, MiB + 512, 4 * MiB, flags=p.CMD_FLAG_REQ_ONE)
    assert chunk.extents == ((MiB - 512, 0),)
    err, (chunk,) = c.structured(p.Cmd.BLOCK_STATUS, SIZE - 1, 2)
    assert err == p.Err.EINVAL and "past the end" in chunk.message
    err, (chunk,) = c.structured(p.Cmd.BLOCK_STATUS, 0, 0)
    assert err == p.Err.EINVAL and "length 0" in chunk.message
    assert c.structured(p.Cmd.READ, 0, 1)[0] == 0                    # still in sync


def test_meta_context_options_per_spec(srv: Served, raw: Callable[..., RawClient]) -> None:
    c = raw()
    set_meta = p.encode_meta_context_request("disk", ("base:allocation",))
    (reply, why), = c.option(p.Option.SET_META_CONTEXT, set_meta)
    assert reply == p.Reply.ERR_INVALID and b"NBD_OPT_STRUCTURED_REPLY" in why
    assert c.option(p.Option.STRUCTURED_REPLY, b"x")[0][0] == p.Reply.ERR_INVALID
    assert c.option(p.Option.STRUCTURED_REPLY) == [(p.Reply.ACK, b"")]
    listed = c.option(p.Option.LIST_META_CONTEXT, p.encode_meta_context_request("disk"))
    assert [(r, p.parse_rep_meta_context(d)) for r, d in listed[:-1]] == [
        (p.Reply.META_CONTEXT, (0, "base:allocation"))] and listed[-1][0] == p.Reply.ACK
    assert c.option(p.Option.LIST_META_CONTEXT, p.encode_meta_context_request(
        "disk", ("qemu:dirty-bitmap:",))) == [(p.Reply.ACK, b"")]
    (reply, why), = c.option(p.Option.SET_META_CONTEXT,
                             p.encode_meta_context_request("nope", ("base:allocation",)))
    assert reply == p.Reply.ERR_UNKNOWN and b"nope" in why
    assert c.option(p.Option.SET_META_CONTEXT, b"\x00\x00\x00\x09ab")[0][0] == p.Reply.ERR_INVALID
    too_many = p.encode_meta_context_request("disk", ("x:",) * (p.MAX_META_QUERIES + 1))
    assert c.option(p.Option.SET_META_CONTEXT, too_many)[0][0] == p.Reply.ERR_TOO_BIG
    # Selected for 'small', then GO to 'disk': no context on 'disk'.
    got = c.option(p.Option.SET_META_CONTEXT,
                   p.encode_meta_context_request("small", ("base:allocation",)))
    assert got[0] == (p.Reply.META_CONTEXT, p.encode_rep_meta_context(1, "base:allocation"))
    c.go("disk")
    err, (chunk,) = c.structured(p.Cmd.BLOCK_STATUS, 0, 512)
    assert err == p.Err.EINVAL and "NBD_OPT_SET_META_CONTEXT" in chunk.message


def test_fast_zero_is_enotsup_when_zeroing_would_write(srv: Served,
                                                       raw: Callable[..., RawClient]) -> None:
    """Fast here means metadata only (a punched hole); otherwise the spec wants ENOTSUP
    at once, with nothing changed, so the client can pick another way."""
    with open(srv.image, "r+b") as f:
        f.write(b"\x77" * 2 * MiB)
    disk = srv.backends["disk"]
    c = raw()
    assert c.negotiate().flags & p.FLAG_SEND_FAST_ZERO
    assert c.structured(p.Cmd.WRITE_ZEROES, 0, MiB, flags=p.CMD_FLAG_FAST_ZERO) == (0, [])
    assert image_bytes(srv.image, 0, MiB) == bytes(MiB) and disk.zeros == 1
    disk.fast_zero = False                          # as a volume that would write zeros
    err, (chunk,) = c.structured(p.Cmd.WRITE_ZEROES, MiB, MiB, flags=p.CMD_FLAG_FAST_ZERO)
    assert err == p.Err.ENOTSUP and "not fast" in chunk.message
    assert image_bytes(srv.image, MiB, MiB) == b"\x77" * MiB and disk.zeros == 1
    assert c.structured(p.Cmd.WRITE_ZEROES, MiB, MiB) == (0, [])       # without: done
    assert image_bytes(srv.image, MiB, MiB) == bytes(MiB)
    # Never advertised to a simple client's WRITE_ZEROES? It still is (flag per export),
    # but a FAST_ZERO flag on another command is EINVAL.
    err, (chunk,) = c.structured(p.Cmd.TRIM, 0, 512, flags=p.CMD_FLAG_FAST_ZERO)
    assert err == p.Err.EINVAL


def test_cache_reads_ahead_and_succeeds(srv: Served, raw: Callable[..., RawClient]) -> None:
    c = raw()
    c.go()
    assert c.request(p.Cmd.CACHE, 0, 4 * MiB) == (0, b"")
    assert srv.backends["disk"].cached == 4 * MiB
    assert c.request(p.Cmd.CACHE, SIZE, 1)[0] == p.Err.EINVAL
    out = run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 4k", srv.uri())
    assert "Pattern verification failed" not in out.stdout


@dataclass
class MinimalBackend:
    """Only the required surface: no extents, no fast zero, no multi-conn, no cache."""

    vol: Volume
    size: int = 0

    def __post_init__(self) -> None:
        self.size = self.vol.size

    def pread(self, offset: int, length: int) -> bytes:
        return self.vol.pread(offset, length)

    def pwrite(self, offset: int, data: memoryview, fua: bool) -> None:
        self.vol.pwrite(offset, data)

    def zero(self, offset: int, length: int, fua: bool) -> None:
        self.vol.zero(offset, length)

    def trim(self, offset: int, length: int) -> None:
        self.vol.zero(offset, length)

    def flush(self) -> None:
        self.vol.fsync()


def test_a_minimal_backend_is_all_data_and_single_connection(tmp_path: Path) -> None:
    image = tmp_path / "min.img"
    with open(image, "wb") as f:
        f.truncate(4 * MiB)
    server = NBDServer(HOST, 0, {"min": MinimalBackend(Volume(str(image), writable=True))},
                       log=logging.getLogger(LOGGER)).start()
    try:
        uri = f"nbd://{HOST}:{server.port}/min"
        (export,) = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"]
        assert not export["can_multi_conn"] and not export["can_fast_zero"]
        assert export["can_cache"] and export["contexts"] == ["base:allocation"]
        (extent,) = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
        assert (extent["offset"], extent["length"], extent["type"]) == (0, 4 * MiB, 0)
        c = RawClient(server.port)
        c.negotiate("min")
        err, (chunk,) = c.structured(p.Cmd.WRITE_ZEROES, 0, 512, flags=p.CMD_FLAG_FAST_ZERO)
        assert err == p.Err.EINVAL and "0x10" in chunk.message      # never offered
        assert c.structured(p.Cmd.CACHE, 0, MiB) == (0, [])
        c.close()
    finally:
        server.stop(5)


# --- fuzzed structured negotiation and requests ----------------------------------------------
def test_fuzzed_meta_context_options_get_an_answer_and_go_still_works(tmp_path: Path) -> None:
    """Hostile META_CONTEXT option data: every option gets META_CONTEXT replies and an
    ACK, or one error reply; nothing closes the connection, and GO works after."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from tests.fuzz import count

    served = serve(tmp_path, {"disk": (0, MiB)}, size=MiB)
    valid = p.encode_meta_context_request("disk", ("base:allocation", "base:"))

    def mutate(data: st.DataObject) -> bytes:
        if data.draw(st.booleans()):        # well-formed, with any names and queries
            queries = data.draw(st.lists(st.sampled_from(
                ["base:allocation", "base:", "base:allocationX", "qemu:dirty-bitmap:a", "",
                 "x-é:q"]) | st.text(max_size=20).filter(lambda q: "\x00" not in q),
                max_size=5))
            name = data.draw(st.sampled_from(["disk", "", "nope"]))
            return p.encode_meta_context_request(name, tuple(queries))
        raw = bytearray(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        if data.draw(st.booleans()):        # cut, or add garbage
            return bytes(raw[:data.draw(st.integers(0, len(raw)))])
        return bytes(raw) + data.draw(st.binary(max_size=4))

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data(), st.booleans(), st.sampled_from([p.Option.LIST_META_CONTEXT,
                                                      p.Option.SET_META_CONTEXT]))
    def one(data: st.DataObject, structured: bool, option: p.Option) -> None:
        c = RawClient(served.server.port)
        try:
            if structured:
                c.option(p.Option.STRUCTURED_REPLY)
            replies = c.option(option, mutate(data))
            last = replies[-1][0]
            assert last == p.Reply.ACK or (last & (1 << 31) and len(replies) == 1)
            for r, d in replies[:-1]:
                assert r == p.Reply.META_CONTEXT
                assert p.parse_rep_meta_context(d)[1] == "base:allocation"
            count("NBD META_CONTEXT options", "answered" if last == p.Reply.ACK else "refused")
            assert c.go("disk").size == MiB
            assert c.request(p.Cmd.FLUSH) == (0, b"") if not structured else \
                c.structured(p.Cmd.FLUSH) == (0, [])
        finally:
            c.close()

    try:
        one()
    finally:
        served.server.stop(5)


def test_fuzzed_structured_requests_get_valid_replies_and_stay_in_sync(tmp_path: Path) -> None:
    """Any READ / BLOCK_STATUS / CACHE / WRITE_ZEROES header (flags, offset, length): the
    reply is well-formed chunks ending DONE, content chunks stay inside the request and
    never overlap, block status never covers more than asked, and the next request is
    still understood."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from tests.fuzz import count

    size = 4 * MiB
    served = serve(tmp_path, {"disk": (0, size)}, size=size)
    with open(served.image, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(MiB))
    c = RawClient(served.server.port)
    c.negotiate()
    offsets = st.one_of(st.integers(0, size + 8192), st.integers(0, 2**64 - 1))
    lengths = st.one_of(st.integers(0, 3 * MiB), st.integers(0, 2**32 - 1))

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from([p.Cmd.READ, p.Cmd.BLOCK_STATUS, p.Cmd.CACHE, p.Cmd.WRITE_ZEROES,
                            p.Cmd.RESIZE, 0x55]),
           st.one_of(st.sampled_from([0, p.CMD_FLAG_FUA, p.CMD_FLAG_DF, p.CMD_FLAG_REQ_ONE,
                                      p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE]),
                     st.integers(0, 0xFFFF)), offsets, lengths)
    def one(cmd: int, flags: int, offset: int, length: int) -> None:
        err, chunks = c.structured(cmd, offset, length, flags)
        if err:
            assert any(isinstance(ch, p.ErrorChunk) and ch.message for ch in chunks) or not chunks
            count("NBD structured requests", "refused")
        else:
            count("NBD structured requests", "served")
        if cmd == p.Cmd.READ and not err:
            end, spans = offset + length, []
            for ch in chunks:
                if isinstance(ch, p.OffsetData):
                    spans.append((ch.offset, ch.offset + len(ch.data)))
                elif isinstance(ch, p.OffsetHole):
                    spans.append((ch.offset, ch.offset + ch.size))
            spans.sort()
            content = bytearray(length)
            for ch in chunks:
                if isinstance(ch, p.OffsetData):
                    content[ch.offset - offset:ch.offset - offset + len(ch.data)] = ch.data
            assert content == image_bytes(served.image, offset, length)
            assert sum(b - a for a, b in spans) == length
            assert all(offset <= a < b <= end for a, b in spans)
            assert all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))
            if flags & p.CMD_FLAG_DF:
                assert len(spans) <= 1
        if cmd == p.Cmd.BLOCK_STATUS and not err:
            (bs,) = chunks
            assert 0 < sum(n for n, _ in bs.extents) <= length
            if flags & p.CMD_FLAG_REQ_ONE:
                assert len(bs.extents) == 1
        assert c.structured(p.Cmd.FLUSH) == (0, [])          # still in sync

    try:
        one()
    finally:
        c.close()
        served.server.stop(5)


# --- a unix socket --------------------------------------------------------------------------
def serve_unix(tmp_path: Path, path: Path) -> Served:
    """A server with one export 'disk' on the unix socket at ``path``."""
    image = tmp_path / "unix.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    backend = VolumeBackend(Volume(str(image), writable=True))
    served = Served(NBDServer(HOST, 0, {"disk": backend}, log=logging.getLogger(LOGGER),
                              path=str(path)), image, {"disk": backend})
    served.server.on_disconnect = served.finished.append
    served.server.start()
    return served


def test_a_unix_socket_serves_real_clients_owner_only_and_goes_at_stop(tmp_path: Path) -> None:
    import stat
    from producers.nbd_capture import Listen
    path = tmp_path / "x2x web&1.sock"          # the URI escapes it, libnbd and QEMU decode
    served = serve_unix(tmp_path, path)
    uri = Listen(path=str(path)).uri("disk")
    assert "%20" in uri and "%26" in uri
    try:
        st = os.stat(path)
        # Whoever can connect can write the volume: the owner only, whatever the umask.
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert int(run("nbdinfo", "--size", uri).stdout) == SIZE
        out = run("qemu-io", "-f", "raw", "-t", "writeback", "-c", "write -P 0x5a 1M 256k",
                  "-c", "flush", "-c", "read -P 0x5a 1M 256k", uri)
        assert "Pattern verification failed" not in out.stdout + out.stderr
        assert image_bytes(served.image, MiB, 256 * 1024) == b"\x5a" * 256 * 1024
        finished = served.wait_finished(2)
        # The kernel names the connecting process: the log says who wrote.
        assert all(c.peer.startswith("unix:pid=") and c.peer.endswith(f",uid={os.getuid()}")
                   for c in finished), [c.peer for c in finished]
        assert finished[-1].bytes_written == 256 * 1024
    finally:
        served.server.stop(5)
    assert not path.exists()
    assert run("nbdinfo", "--size", uri, check=False).returncode != 0


def test_a_unix_socket_replaces_a_dead_servers_file_and_nothing_else(tmp_path: Path) -> None:
    # A file that is no socket: refused by name, and left as it was.
    path = tmp_path / "x2x.sock"
    path.write_bytes(b"not a socket")
    with pytest.raises(OSError) as e:
        serve_unix(tmp_path, path)
    assert e.value.errno == errno.EEXIST and str(path) in str(e.value)
    assert path.read_bytes() == b"not a socket"
    path.unlink()
    # A socket a dead server left (bound, never unlinked): replaced, and served.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.exists()
    first = serve_unix(tmp_path, path)
    try:
        assert int(run("nbdinfo", "--size", f"nbd+unix:///disk?socket={path}").stdout) == SIZE
        # A live server's: refused, and the live one keeps its socket and its clients.
        (tmp_path / "second").mkdir()
        with pytest.raises(OSError) as e:
            serve_unix(tmp_path / "second", path)
        assert e.value.errno == errno.EADDRINUSE and "already listens" in str(e.value)
        assert int(run("nbdinfo", "--size", f"nbd+unix:///disk?socket={path}").stdout) == SIZE
    finally:
        first.server.stop(5)
    assert not path.exists()
