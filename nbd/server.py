"""A threaded NBD server: the protocol layer of the NBD capturer.

It knows nothing of Kafka. Each named export is a :class:`Backend` (the short surface
nbdkit plugins have: size, pread, pwrite, zero, trim, flush); the journaling volume that
publishes writes is one such backend, a plain image file another.

Per client connection, one thread reads requests (in order: payloads follow their
headers) and a few workers serve them, so requests in flight overlap as the protocol
allows (replies carry the client's cookie and may come in any order): a slow local
write, a block allocation or a wait for the broker in sync mode no longer holds up the
requests behind it. The backend keeps ordering where it matters (the journaling volume's
range locks). A FLUSH covers the writes already replied to, as the protocol says. Bad
input from one client closes or answers that client only, with one log line naming the
peer; the server keeps serving everyone else. Wire formats live in ``nbd.proto``.

What a client may negotiate, as qemu-nbd and nbdkit offer it:

- structured replies: READs are answered in chunks, holes as OFFSET_HOLE (no bytes on
  the wire, nothing read from the backend), failures as ERROR chunks carrying the reason;
  other commands keep simple replies on success (proto.md allows it);
- the ``base:allocation`` metadata context: NBD_CMD_BLOCK_STATUS reports holes and data
  from the backend's ``extents`` (all data when it has none);
- fast zero: WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO fails at once with ENOTSUP, touching
  nothing, when the backend's ``zero_is_fast`` says zeroing would write zeros;
- NBD_CMD_CACHE: the backend's ``cache`` (read-ahead), or nothing; it always succeeds;
- multi-conn: NBD_FLAG_CAN_MULTI_CONN only for a backend whose ``multi_conn`` is true,
  i.e. whose FLUSH (and FUA) covers every connection's completed writes.

Extended headers (NBD_OPT_EXTENDED_HEADERS) are not offered: the clients we test with
(libnbd 1.14, qemu 7.2) predate them, so the option gets NBD_REP_ERR_UNSUP.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import socket
import ssl
import stat
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from nbd import proto as p

_log = logging.getLogger("x2x.nbd")

_DISCARD_CHUNK = 1 << 20
#: What the reader asks the socket for at once in transmission: a client at queue depth
#: 16 sends its requests back to back (of 4 KiB writes: 66 KiB), which one recv takes.
_READ_AHEAD = 256 * 1024
#: Replies held back while more requests wait in the reader's buffer, at most.
_MAX_HELD = 64
#: A quick write this long or shorter is served by the reader itself
#: (:meth:`NBDServer._quick_write`).
_INLINE_MAX = 64 * 1024
#: A READ this long or shorter is served by the reader itself when the page cache holds
#: it (:meth:`NBDServer._read_now`): nbdcopy's requests (256 KiB) and anything smaller.
_INLINE_READ_MAX = 256 * 1024
#: The requests a quick-writing backend's reader may serve itself, and the flags each
#: may carry: no FUA (an fsync), no FAST_ZERO (its answer depends on the backend).
#: NO_HOLE changes nothing here: zeroing deallocates where it can either way.
_QUICK_FLAGS = {p.Cmd.WRITE: 0, p.Cmd.WRITE_ZEROES: p.CMD_FLAG_NO_HOLE}
_ACCEPT_POLL_S = 0.25
#: Workers per connection, and what one connection may have in flight (requests, and
#: payload bytes read ahead of the workers). A write the backend completes later (a
#: sync capture's) holds no worker, only its place in flight.
WORKERS = 16
MAX_INFLIGHT_REQUESTS = 32
MAX_INFLIGHT_BYTES = 64 << 20
#: How long a closing connection waits for the outcome of writes completed later.
DRAIN_TIMEOUT = 90.0
#: A client must finish the handshake (TLS included) within this time: a connection that
#: sends nothing would otherwise hold its thread for ever, before any authentication.
HANDSHAKE_TIMEOUT = 30.0
#: Connections served at once; more are closed at accept, with one log line per second.
MAX_CONNECTIONS = 128
# The transmission flags every export has; the others depend on the backend and on what
# the connection negotiated (:func:`transmission_flags`).
TRANSMISSION_FLAGS = (p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA
                      | p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES | p.FLAG_SEND_CACHE)
#: The metadata contexts we serve.
META_CONTEXTS = (p.META_BASE_ALLOCATION,)


class Backend(Protocol):
    """What an export is: a byte-addressed volume. Failures raise OSError with an errno,
    or :class:`Shutdown` to refuse the request and disconnect the client.

    Optional, looked up with getattr (a backend without them still works):

    - ``extents(offset, length, limit) -> list[(length, hole)]``: allocation of the
      range as consecutive runs from ``offset``, at least one and at most ``limit``;
      a hole reads as zeros. Without it everything is data.
    - ``zero_is_fast() -> bool``: would ``zero`` change metadata rather than write
      zeros? Its presence advertises NBD_FLAG_SEND_FAST_ZERO.
    - ``cache(offset, length)``: read-ahead for NBD_CMD_CACHE.
    - ``multi_conn: bool``: true only if ``flush`` (and a FUA write) makes the completed
      writes of every connection to this backend durable, so clients may spread
      requests over several connections (NBD_FLAG_CAN_MULTI_CONN).
    - ``quick_writes: bool``: ``pwrite`` without FUA waits for nothing slow (no fsync,
      no network): the reader thread then serves such a WRITE itself when it is small
      or nothing else of its connection is in flight, instead of waking a worker for
      it (:meth:`NBDServer._quick_write`). So is a WRITE_ZEROES while
      ``zero_is_fast()`` (a hole punched); zeroing that writes zeros is left to workers.
    - ``pread_cached(offset, length) -> bytes | None``: ``pread`` if it waits for no
      disk (the page cache holds it), else None: the reader then serves a small READ
      itself (:meth:`NBDServer._read_now`), and a worker the rest.
    - ``quick_flush: bool`` with ``flush_local()``: a FLUSH waits for the local disk
      only (no network): ``flush_local`` makes the writes durable and returns what is
      left to do (async capture: journal the consistency point), which the server runs
      once the reply is sent; the reader serves such a FLUSH itself when nothing else of
      its connection is in flight.
    - ``journals_later: bool`` with ``pwrite_then(offset, data, done, then)``: a WRITE
      without FUA is done at once but its reply waits for something the backend reports
      itself (sync capture: the broker's acknowledgement): the reader calls
      ``pwrite_then``; ``done(None)`` or ``done(OSError)`` replies, from whichever
      thread calls it, and the backend calls ``then()`` after the ``done`` calls it
      makes together (a successful reply is held until then, so the replies of the
      writes one acknowledgement completes go out in one send); and ``ship()``, which
      the reader calls before it may wait (for its client, or for room to read ahead),
      to start what the writes it served since wait for.
    """

    size: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def pwrite(self, offset: int, data: memoryview, fua: bool) -> None: ...

    def zero(self, offset: int, length: int, fua: bool) -> None: ...

    def trim(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...


class Shutdown(Exception):
    """Raised by a backend to refuse a request: the client gets ESHUTDOWN, then is closed."""


class _PeerGone(Exception):
    """The client closed the connection (``mid_message`` when inside a message)."""

    def __init__(self, mid_message: bool) -> None:
        super().__init__("mid-message" if mid_message else "between messages")
        self.mid_message = mid_message


class _Close(Exception):
    """End this connection now; the message is the one log line saying why."""


@dataclass
class ClientInfo:
    """One connected client, for status displays (snapshots are copies)."""

    peer: str
    connected_at: float
    export: str | None = None
    requests: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    #: Of ``bytes_read``, what was answered as holes (OFFSET_HOLE chunks, nothing read).
    bytes_holes: int = 0


@dataclass
class _Conn:
    sock: socket.socket          # an ssl.SSLSocket once STARTTLS succeeded
    info: ClientInfo
    thread: threading.Thread | None = None
    no_zeroes: bool = False
    tls: bool = False
    #: NBD_OPT_STRUCTURED_REPLY was acknowledged.
    structured: bool = False
    #: The export base:allocation was selected for (NBD_OPT_SET_META_CONTEXT), if any;
    #: it counts only if the client then goes to that export.
    meta_export: str | None = None
    #: In transmission: may the client send NBD_CMD_BLOCK_STATUS?
    block_status: bool = False
    #: In transmission: did the export offer NBD_FLAG_SEND_FAST_ZERO?
    fast_zero: bool = False
    #: Set once the connection must end (the backend shut down, a reply failed): the
    #: reader stops taking requests, the workers' replies stop.
    closing: bool = False
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    count_lock: threading.Lock = field(default_factory=threading.Lock)
    inflight: "_Inflight" = field(default_factory=lambda: _Inflight(MAX_INFLIGHT_REQUESTS,
                                                                     MAX_INFLIGHT_BYTES))
    #: Replies held back to go out together, in one send (:meth:`send_held`): those of
    #: requests the reader served itself while more requests were waiting in its
    #: buffer, and those of writes a backend completes together, until its ``then``
    #: (:meth:`send_completed`).
    held: list[bytes] = field(default_factory=list)

    def reply(self, header: bytes, data: bytes | None = None, hold: bool = False) -> None:
        """Send one reply whole (replies of several workers never interleave); ``hold``
        keeps a small one back for the next send (the reader's, before it waits)."""
        with self.send_lock:
            if self.closing:
                return
            if hold or (self.held and (data is None or len(data) <= _INLINE_MAX)):
                # Held, or sent with the held ones in one send.
                self.held.append(header if data is None else header + data)
                if not hold or len(self.held) >= _MAX_HELD:
                    self._send_held()
                return
            self._send_held()
            _send_all(self.sock, header, data)

    def reply_chunks(self, chunks: list[tuple[bytes, bytes | None]]) -> None:
        """Send a structured reply's chunks together, in order."""
        with self.send_lock:
            if not self.closing:
                self._send_held()
                for header, data in chunks:
                    _send_all(self.sock, header, data)

    def send_held(self) -> None:
        """Send the replies held back (before the reader may wait for the client, who
        may be waiting for them)."""
        if self.held:
            with self.send_lock:
                if not self.closing:
                    self._send_held()

    def send_completed(self) -> None:
        """Send the replies of the writes a backend completed together (its ``then``); a
        failed send ends the connection, as a failed reply does."""
        try:
            self.send_held()
        except OSError:
            self.closing = True
            _shutdown_socket(self.sock)

    def _send_held(self) -> None:
        if self.held:
            # Cleared first: a failed send must not send them twice.
            held, self.held = self.held, []
            self.sock.sendall(b"".join(held))

    def error_reply(self, err: p.Err, cookie: int, message: str) -> bytes:
        """An error reply: an ERROR chunk with the reason once structured replies are
        negotiated (proto.md prefers it, and requires it for READ), else a simple one."""
        if self.structured:
            return p.encode_error_chunk(p.REPLY_FLAG_DONE, cookie, err, message)
        return p.encode_simple_reply(err, cookie)


class _Reader:
    """A connection's requests, read from its socket in large pieces: one recv takes
    every request a client has queued, where exact reads cost two per request (header,
    payload). Before a recv that may wait, ``before_wait`` runs: it sends the replies
    held back meanwhile, which the client may be waiting for."""

    def __init__(self, sock: socket.socket, before_wait: Callable[[], None]) -> None:
        self.sock, self.before_wait = sock, before_wait
        self._buf = memoryview(bytearray(_READ_AHEAD))
        self._start = self._end = 0

    def buffered(self) -> int:
        """Bytes received and not yet taken."""
        return self._end - self._start

    def read_into(self, out: memoryview, at_boundary: bool) -> None:
        """Fill ``out`` completely; EOF raises _PeerGone (mid-message unless nothing of
        it arrived and ``at_boundary``). A payload longer than the buffer goes straight
        from the socket into ``out``, not through the buffer."""
        done = 0
        while done < len(out):
            if self._start == self._end:
                self.before_wait()
                if len(out) - done >= len(self._buf):
                    _recv_into(self.sock, out[done:], at_boundary and not done)
                    return
                self._fill(at_boundary and not done)
            n = min(len(out) - done, self._end - self._start)
            out[done:done + n] = self._buf[self._start:self._start + n]
            self._start += n
            done += n

    def discard(self, length: int) -> None:
        """Skip ``length`` bytes of payload."""
        while length:
            if self._start == self._end:
                self.before_wait()
                self._fill(False)
            n = min(length, self._end - self._start)
            self._start += n
            length -= n

    def _fill(self, at_boundary: bool) -> None:
        try:
            n = self.sock.recv_into(self._buf)
        except (ConnectionResetError, BrokenPipeError):
            n = 0
        if n == 0:
            raise _PeerGone(mid_message=not at_boundary)
        self._start, self._end = 0, n


class _Inflight:
    """Bounds what a connection has read ahead of its workers."""

    def __init__(self, requests: int, nbytes: int) -> None:
        self.max_requests, self.max_bytes = requests, nbytes
        self.requests = self.bytes = 0
        self.waiting = False
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, before_wait: Callable[[], None]) -> None:
        """Take room for a request of ``nbytes``; ``before_wait`` runs (without the
        lock) before this waits for room, as before a read that may wait."""
        while not self._take(nbytes):
            before_wait()
            with self._cond:
                if not self._take(nbytes):
                    self.waiting = True
                    self._cond.wait()

    def _take(self, nbytes: int) -> bool:
        with self._cond:
            if self.requests >= self.max_requests or (
                    self.requests and self.bytes + nbytes > self.max_bytes):
                return False
            self.requests += 1
            self.bytes += nbytes
            return True

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if something still is after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.requests:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.waiting = True
                self._cond.wait(left)
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.requests -= 1
            self.bytes -= nbytes
            # Only the reader ever waits: a notify when it does not costs every request.
            if self.waiting:
                self.waiting = False
                self._cond.notify_all()


class _Workers:
    """A connection's worker threads, fed through one C-level queue: a request costs a
    put and a get, not ThreadPoolExecutor's Future, work item and semaphore (its submit
    was a sixth of the NBD capturer's GIL time under pgbench). A thread starts when more
    requests overlap than threads run, up to ``limit``."""

    def __init__(self, limit: int, name: str) -> None:
        self.limit, self.name = limit, name
        self._queue: queue.SimpleQueue[tuple[Callable[..., None], tuple] | None] = \
            queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def submit(self, overlapping: int, fn: Callable[..., None], *args: object) -> None:
        """Run ``fn(*args)`` on a worker; ``overlapping``: requests in flight, this one
        included (a racy read is harmless: a thread starts one request late or early)."""
        if len(self._threads) < min(overlapping, self.limit):
            t = threading.Thread(target=self._run, daemon=True,
                                 name=f"{self.name}-{len(self._threads)}")
            self._threads.append(t)
            t.start()
        self._queue.put((fn, args))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args = item
            fn(*args)

    def shutdown(self) -> None:
        """Let the queued requests finish, then stop every thread."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()


@dataclass
class NBDServer:
    """Serve ``exports`` over NBD on ``host:port`` (port 0 picks a free port), or on the
    unix socket at ``path`` when one is given.

    ``on_disconnect`` is called with the final :class:`ClientInfo` of each client.
    With ``tls`` clients may upgrade with NBD_OPT_STARTTLS; with ``tls_required`` too they
    must, before any other option (infra/tls.py builds the context).
    """

    host: str
    port: int
    exports: dict[str, Backend]
    log: logging.Logger = _log
    on_disconnect: Callable[[ClientInfo], None] | None = None
    tls: ssl.SSLContext | None = None
    tls_required: bool = False
    workers: int = WORKERS
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    #: Called after each request's reply with (export, command, seconds from the request
    #: read to its reply sent); ``command`` in lower case (``write``, ``flush`` ...).
    on_request: Callable[[str, str, float], None] | None = None
    #: A unix socket to listen on instead of ``host:port`` (:func:`bind_unix`).
    path: str | None = None
    _listener: socket.socket | None = field(init=False, default=None)
    #: The socket file this server made, (device, inode): removed at stop if still it.
    _made: tuple[int, int] | None = field(init=False, default=None)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _accept_thread: threading.Thread | None = field(init=False, default=None)
    _conns: dict[int, _Conn] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _refused: int = field(init=False, default=0)
    _refused_logged: float = field(init=False, default=0.0)

    # --- lifecycle ------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind and listen (idempotent); afterwards ``.port`` is the real port."""
        if self._listener is not None:
            return
        if self.path is not None:
            sock, self._made = bind_unix(self.path)
        else:
            sock = socket.create_server((self.host, self.port), reuse_port=False, backlog=64)
            self.port = sock.getsockname()[1]
        # A timeout lets the accept loop notice stop() without racing on a closed fd.
        sock.settimeout(_ACCEPT_POLL_S)
        self._listener = sock
        self.log.info("NBD server listening on %s, exports %s", self.where,
                      ", ".join(repr(n) for n in self.exports))

    @property
    def where(self) -> str:
        """Where it listens, as logs say it: ``unix:PATH`` or ``HOST:PORT``."""
        return f"unix:{self.path}" if self.path is not None else host_port(self.host, self.port)

    def start(self) -> "NBDServer":
        """Bind, then accept clients in a background thread."""
        self.bind()
        self._accept_thread = threading.Thread(target=self.serve_forever,
                                               name=f"nbd-accept-{self.where}", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        """Accept clients until :meth:`stop`; each one gets its own thread."""
        self.bind()
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stopping.is_set():
                    break
                self.log.warning("NBD accept failed: %s", e)
                time.sleep(_ACCEPT_POLL_S)
                continue
            peer = _peer_name(sock, addr)
            try:
                self._spawn(sock, peer)
            except RuntimeError as e:   # no thread to be had: refuse this one, go on
                self.log.error("NBD %s refused: cannot start a thread for it (%s)", peer, e)
                sock.close()
                time.sleep(_ACCEPT_POLL_S)

    def stop(self, timeout: float = 5.0, grace: float = 0.0) -> None:
        """Stop accepting, disconnect every client and join all threads.

        With ``grace`` > 0 the clients' receiving side is shut first: a request being
        served finishes and its reply is sent, then the connection ends at the next
        request boundary; clients still busy after ``grace`` seconds are cut off.
        """
        self._stopping.set()
        if self._listener is not None:
            _shutdown_socket(self._listener)  # wakes a blocked accept() at once on Linux
        if self._accept_thread is not None and self._accept_thread is not threading.current_thread():
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        if self._made is not None:
            _unlink_if(self.path, self._made)
            self._made = None
        with self._lock:
            conns = list(self._conns.values())
        if grace > 0:
            for conn in conns:
                _shutdown_socket(conn.sock, socket.SHUT_RD)  # replies can still go out
            deadline = time.monotonic() + grace
            for conn in conns:
                if conn.thread is not None:
                    conn.thread.join(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            _shutdown_socket(conn.sock)
        deadline = time.monotonic() + timeout
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def clients(self) -> list[ClientInfo]:
        """Snapshots of the connected clients."""
        with self._lock:
            return [replace(c.info) for c in self._conns.values()]

    # --- per connection -------------------------------------------------------------------
    def _spawn(self, sock: socket.socket, peer: str) -> None:
        if self._stopping.is_set():  # accepted while stop() ran: it would never be joined
            sock.close()
            return
        with self._lock:
            full = len(self._conns) >= self.max_connections
        if full:
            self._refuse(sock, peer)
            return
        sock.settimeout(self.handshake_timeout)     # until an export is chosen
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, ClientInfo(peer=peer, connected_at=time.time()))
        conn.thread = threading.Thread(target=self._serve_client, args=(conn,),
                                       name=f"nbd-client-{conn.info.peer}", daemon=True)
        with self._lock:
            self._conns[id(conn)] = conn
        try:
            conn.thread.start()
        except RuntimeError:
            with self._lock:
                self._conns.pop(id(conn), None)
            raise

    def _refuse(self, sock: socket.socket, peer: str) -> None:
        """Close a connection over the cap; one log line a second says how many."""
        sock.close()
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 1.0:
            self.log.warning("NBD %s refused: %d connections already (the cap); %d "
                             "refused since the last warning", peer,
                             self.max_connections, self._refused)
            self._refused, self._refused_logged = 0, now

    def _serve_client(self, conn: _Conn) -> None:
        peer = conn.info.peer
        try:
            export = self._handshake(conn)
            if export is not None:
                conn.sock.settimeout(None)      # requests may pause as long as they like
                self._transmission(conn, export)
        except TimeoutError:
            self.log.warning("NBD %s: no complete handshake within %.0f s; closing", peer,
                             self.handshake_timeout)
        except _Close as e:
            self.log.warning("NBD %s: %s; closing", peer, e)
        except _PeerGone as e:
            if conn.closing:
                self.log.info("NBD %s: disconnected after the export refused requests", peer)
            elif self._stopping.is_set():
                self.log.info("NBD %s: disconnected by server stop", peer)
            elif e.mid_message:
                self.log.warning("NBD %s: client vanished mid-message (the partial message"
                                 " was dropped)", peer)
            else:
                self.log.info("NBD %s: client closed the connection without NBD_CMD_DISC", peer)
        except OSError as e:
            self.log.warning("NBD %s: connection lost: %s", peer, e)
        except Exception:  # noqa: BLE001 - one bad client must not take the server down
            self.log.exception("NBD %s: unexpected error; closing", peer)
        finally:
            _shutdown_socket(conn.sock)
            conn.sock.close()
            with self._lock:
                self._conns.pop(id(conn), None)
            if self.on_disconnect is not None:
                try:
                    self.on_disconnect(replace(conn.info))
                except Exception:  # noqa: BLE001 - a status hook must not break the server
                    self.log.exception("NBD %s: on_disconnect hook failed", peer)

    # --- handshake ------------------------------------------------------------------------
    def _handshake(self, conn: _Conn) -> tuple[str, Backend] | None:
        """Greet, then haggle options until the client picks an export (None: it left)."""
        conn.sock.sendall(p.encode_server_greeting())
        try:
            flags = p.parse_client_flags(_recv_exact(conn.sock, p.CLIENT_FLAGS_SIZE))
        except p.ProtocolError as e:
            raise _Close(f"bad client flags: {e}") from None
        conn.no_zeroes = bool(flags & p.FLAG_C_NO_ZEROES)
        while True:
            try:
                raw = bytearray(p.OPTION_HEADER_SIZE)
                _recv_into(conn.sock, memoryview(raw), at_boundary=True)
                header = p.parse_option_header(raw)
            except p.ProtocolError as e:
                raise _Close(f"bad option request: {e}") from None
            data = _recv_exact(conn.sock, header.length)
            chosen = self._option(conn, header.option, data)
            if chosen is not None:
                return chosen
            if header.option == p.Option.ABORT:
                self.log.info("NBD %s: client aborted the handshake", conn.info.peer)
                return None

    def _option(self, conn: _Conn, option: int, data: bytes) -> tuple[str, Backend] | None:
        """Answer one option; returns the export once the client enters transmission."""
        send = conn.sock.sendall
        if self.tls_required and not conn.tls and option not in (p.Option.STARTTLS,
                                                                 p.Option.ABORT):
            if option == p.Option.EXPORT_NAME:     # it has no error reply: close
                raise _Close("NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS; this server "
                             "requires TLS")
            self.log.warning("NBD %s: %s refused: TLS is required and the client did not "
                             "start it (NBD_OPT_STARTTLS)", conn.info.peer, _opt_name(option))
            send(p.encode_option_reply(option, p.Reply.ERR_TLS_REQD))
            return None
        if option == p.Option.EXPORT_NAME:
            return self._opt_export_name(conn, data)
        if option == p.Option.ABORT:
            send(p.encode_option_reply(option, p.Reply.ACK))
        elif option == p.Option.LIST:
            if data:
                send(p.encode_option_reply(option, p.Reply.ERR_INVALID))
                return None
            for name in self.exports:
                send(p.encode_option_reply(option, p.Reply.SERVER, p.encode_rep_server(name)))
            send(p.encode_option_reply(option, p.Reply.ACK))
        elif option in (p.Option.INFO, p.Option.GO):
            return self._opt_info(conn, option, data)
        elif option == p.Option.STARTTLS:
            self._opt_starttls(conn, data)
        elif option == p.Option.STRUCTURED_REPLY:
            if data:
                self._opt_refuse(conn, option, p.Reply.ERR_INVALID,
                                 f"NBD_OPT_STRUCTURED_REPLY carries no data, got {len(data)} bytes")
            else:
                conn.structured = True
                send(p.encode_option_reply(option, p.Reply.ACK))
        elif option in (p.Option.LIST_META_CONTEXT, p.Option.SET_META_CONTEXT):
            self._opt_meta_context(conn, option, data)
        else:
            send(p.encode_option_reply(option, p.Reply.ERR_UNSUP))
        return None

    def _opt_refuse(self, conn: _Conn, option: int, reply: p.Reply, why: str) -> None:
        """An error reply carrying its reason (a string the client may show), logged."""
        self.log.warning("NBD %s: %s refused with %s: %s", conn.info.peer, _opt_name(option),
                         reply.name, why)
        conn.sock.sendall(p.encode_option_reply(option, reply, why.encode("utf-8")))

    def _opt_meta_context(self, conn: _Conn, option: int, data: bytes) -> None:
        """LIST or SET the metadata contexts (base:allocation) of one export."""
        send = conn.sock.sendall
        setting = option == p.Option.SET_META_CONTEXT
        if setting:
            conn.meta_export = None         # SET replaces the selection, even if it fails
        if not conn.structured:
            self._opt_refuse(conn, option, p.Reply.ERR_INVALID,
                             "metadata contexts need NBD_OPT_STRUCTURED_REPLY first")
            return
        try:
            req = p.parse_meta_context_request(data)
        except p.TooBig as e:
            self._opt_refuse(conn, option, p.Reply.ERR_TOO_BIG, str(e))
            return
        except p.ProtocolError as e:
            self._opt_refuse(conn, option, p.Reply.ERR_INVALID, str(e))
            return
        found = self._find_export(req.name)
        if found is None:
            self._opt_refuse(conn, option, p.Reply.ERR_UNKNOWN, f"unknown export {req.name!r}")
            return
        chosen = p.match_meta_contexts(req.queries, META_CONTEXTS, listing=not setting)
        for ctx in chosen:
            # LIST's ids are reserved (zero); SET's are what BLOCK_STATUS chunks carry.
            ctx_id = p.BASE_ALLOCATION_ID if setting else 0
            send(p.encode_option_reply(option, p.Reply.META_CONTEXT,
                                       p.encode_rep_meta_context(ctx_id, ctx)))
        if setting and chosen:
            conn.meta_export = found[0]
        send(p.encode_option_reply(option, p.Reply.ACK))

    def _opt_starttls(self, conn: _Conn, data: bytes) -> None:
        send = conn.sock.sendall
        if self.tls is None:
            send(p.encode_option_reply(p.Option.STARTTLS, p.Reply.ERR_POLICY))
        elif data or conn.tls:
            send(p.encode_option_reply(p.Option.STARTTLS, p.Reply.ERR_INVALID))
        else:
            send(p.encode_option_reply(p.Option.STARTTLS, p.Reply.ACK))
            try:
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
            except (ssl.SSLError, OSError) as e:
                raise _Close(f"TLS handshake failed: {e}") from None
            conn.tls = True
            # proto.md: what was negotiated in clear does not carry over into TLS.
            conn.structured, conn.meta_export = False, None
            self.log.info("NBD %s: TLS established (%s)", conn.info.peer, conn.sock.version())

    def _opt_export_name(self, conn: _Conn, data: bytes) -> tuple[str, Backend]:
        # EXPORT_NAME has no error reply: the spec says to close on an unknown export.
        try:
            name = p.parse_export_name(data)
        except p.ProtocolError as e:
            raise _Close(f"NBD_OPT_EXPORT_NAME: {e}") from None
        found = self._find_export(name)
        if found is None:
            raise _Close(f"NBD_OPT_EXPORT_NAME for unknown export {name!r}")
        conn.sock.sendall(p.encode_export_name_reply(
            p.ExportInfo(found[1].size, transmission_flags(found[1], conn.structured)),
            conn.no_zeroes))
        return found

    def _opt_info(self, conn: _Conn, option: int, data: bytes) -> tuple[str, Backend] | None:
        send = conn.sock.sendall
        try:
            req = p.parse_info_request(data)
        except p.ProtocolError as e:
            self.log.warning("NBD %s: invalid %s: %s", conn.info.peer, p.Option(option).name, e)
            send(p.encode_option_reply(option, p.Reply.ERR_INVALID))
            return None
        found = self._find_export(req.name)
        if found is None:
            self.log.warning("NBD %s: %s for unknown export %r", conn.info.peer,
                             p.Option(option).name, req.name)
            send(p.encode_option_reply(option, p.Reply.ERR_UNKNOWN))
            return None
        info = p.ExportInfo(found[1].size, transmission_flags(found[1], conn.structured))
        send(p.encode_option_reply(option, p.Reply.INFO, p.encode_info_export(info)))
        # Always sent: the spec allows it unrequested, and it tells clients our 32 MiB cap.
        send(p.encode_option_reply(option, p.Reply.INFO, p.encode_info_block_size(p.BLOCK_SIZE)))
        send(p.encode_option_reply(option, p.Reply.ACK))
        return found if option == p.Option.GO else None

    def _find_export(self, name: str) -> tuple[str, Backend] | None:
        if name in self.exports:
            return name, self.exports[name]
        if name == "" and len(self.exports) == 1:
            return next(iter(self.exports.items()))
        return None

    # --- transmission ---------------------------------------------------------------------
    def _transmission(self, conn: _Conn, export: tuple[str, Backend]) -> None:
        name, backend = export
        conn.info.export = name
        conn.block_status = conn.structured and conn.meta_export == name
        conn.fast_zero = _can_fast_zero(backend)
        self.log.info("NBD %s: serving export %r (%d bytes)", conn.info.peer, name, backend.size)
        pool = _Workers(self.workers, f"nbd-{conn.info.peer}")
        ship = getattr(backend, "ship", None) if getattr(backend, "journals_later",
                                                         False) else None
        reader = _Reader(conn.sock, conn.send_held if ship is None
                         else lambda: (ship(), conn.send_held()))
        header = bytearray(p.REQUEST_SIZE)
        view = memoryview(header)
        # Read once: a backend's mode is fixed for its life.
        quick = bool(getattr(backend, "quick_writes", False))
        # Asked per request: a filesystem may refuse to punch holes from one on.
        zero_fast: Callable[[], bool] = getattr(backend, "zero_is_fast", lambda: False)
        try:
            while not conn.closing:
                reader.read_into(view, at_boundary=True)
                try:
                    req = p.parse_request(header)
                except p.ProtocolError as e:
                    raise _Close(str(e)) from None
                if req.type == p.Cmd.DISC:
                    self.log.info("NBD %s: client disconnected (NBD_CMD_DISC)", conn.info.peer)
                    return
                conn.info.requests += 1
                allowed = _QUICK_FLAGS.get(req.type)
                if (quick and allowed is not None and not req.flags & ~allowed and req.length
                        and (req.length <= _INLINE_MAX or not conn.inflight.requests)
                        and (req.type == p.Cmd.WRITE or zero_fast())
                        and not p.request_error(req, backend.size)[0]):
                    # A valid write without FUA that waits for nothing slow (anything
                    # request_error objects to is _take's to refuse).
                    self._quick_write(conn, backend, req, reader)
                else:
                    self._take(conn, backend, req, pool, reader)
        finally:
            conn.send_held()
            pool.shutdown()             # requests in flight finish and are answered
            # ... and so do writes the backend completes later (their journal's outcome
            # comes within its stall limit).
            if not conn.inflight.drain(DRAIN_TIMEOUT):
                self.log.warning("NBD %s: %d requests still unanswered after %.0f s; closing",
                                 conn.info.peer, conn.inflight.requests, DRAIN_TIMEOUT)
            # Completed writes may still be held for their backend's ``then``.
            conn.send_completed()
        # A worker ended the connection (ESHUTDOWN sent, then FIN): let the client read
        # it before the socket closes, since closing with unread data would send RST.
        _close_gracefully(conn.sock)

    def _take(self, conn: _Conn, backend: Backend, req: p.Request,
              pool: _Workers, reader: _Reader) -> None:
        """Read one request's payload (reader thread) and hand it to a worker, or serve
        an async FLUSH or a sync WRITE itself; requests the server refuses outright are
        answered here."""
        peer = conn.info.peer
        if req.type == p.Cmd.WRITE and req.length > p.MAX_PAYLOAD:
            # Its payload cannot be skipped at a sane cost, so the stream is lost.
            raise _Close(f"NBD_CMD_WRITE of {req.length} bytes exceeds {p.MAX_PAYLOAD}")
        error, why = p.request_error(req, backend.size, structured=conn.structured,
                                     block_status=conn.block_status,
                                     fast_zero=conn.fast_zero)
        if error:
            if req.type == p.Cmd.WRITE:
                reader.discard(req.length)
            self.log.warning("NBD %s: %s flags=%#x offset=%d length=%d (%s) refused with %s",
                             peer, _cmd_name(req.type), req.flags, req.offset, req.length,
                             why, error.name)
            conn.reply(conn.error_reply(error, req.cookie, why))
            return
        # Reads count too: their reply data is held until it is sent.
        size = req.length if req.type in (p.Cmd.WRITE, p.Cmd.READ) else 0
        t0 = time.monotonic()
        conn.inflight.acquire(size, reader.before_wait)
        payload: bytearray | None = None
        try:
            if req.type == p.Cmd.WRITE:
                # A fresh buffer per request, never reused: the backend may keep a
                # view of it (the journal holds the op until the broker has it).
                payload = bytearray(req.length)
                reader.read_into(memoryview(payload), at_boundary=False)
        except BaseException:
            conn.inflight.release(size)
            raise
        if (req.type == p.Cmd.WRITE and not req.flags & p.CMD_FLAG_FUA
                and getattr(backend, "journals_later", False)):
            # No thread waits for its acknowledgement: the reply comes from the
            # backend's completion (a worker per write in flight, each woken by the
            # acknowledgement, cost a sync capture more CPU than the write).
            self._serve(conn, backend, req, payload, size, t0, later=True)
            return
        if (req.type == p.Cmd.FLUSH and conn.inflight.requests == 1
                and getattr(backend, "quick_flush", False)):
            # Nothing else of this connection in flight: waking a worker would only add
            # its wake-up to a FLUSH the client waits for (a database's every commit).
            # What the reader served and held goes out first.
            conn.send_held()
            self._serve(conn, backend, req, payload, size, t0)
            return
        if (req.type == p.Cmd.READ and req.length <= _INLINE_READ_MAX
                and self._read_now(conn, backend, req, size, t0)):
            return
        pool.submit(conn.inflight.requests, self._serve, conn, backend, req, payload, size,
                    t0)

    def _read_now(self, conn: _Conn, backend: Backend, req: p.Request, size: int,
                  t0: float) -> bool:
        """Serve a READ on the reader if the backend's page cache holds all of it: a
        worker's wake-up costs more than copying a cached block (nbdcopy out of a capture
        with 4 connections: 0.8-1.0 GB/s through workers, 1.1-1.3 read here). True when
        answered; False leaves it to a worker (it would wait for the disk, or failed:
        the worker's read says how)."""
        cached = getattr(backend, "pread_cached", None)
        if cached is None:
            return False
        try:
            chunks = self._read_reply(conn, backend, req, cached)
        except OSError:
            return False
        if chunks is None:
            return False
        try:
            conn.reply_chunks(chunks)
        except OSError as e:
            self._reply_lost(conn, req, e)
        finally:
            conn.inflight.release(size)
        if self.on_request is not None:
            self.on_request(conn.info.export or "", "read", time.monotonic() - t0)
        return True

    def _quick_write(self, conn: _Conn, backend: Backend, req: p.Request,
                     reader: _Reader) -> None:
        """Serve a quick WRITE, or a WRITE_ZEROES that punches a hole, on the reader
        itself, in as few steps as it takes: under random 4 KiB writes at queue depth 16
        the reader's Python is the capturer's wall, and a sparse image copied in is as
        many zeroed ranges as written ones. Waking a worker would cost more than a small
        request (under pgbench the wake-up, made holding the GIL, was a fifth of the NBD
        capturer's GIL time); a large one overlaps its copy with the next requests' on a
        worker unless nothing else is in flight. Nothing is read ahead of it, so it takes
        no share of the connection's in-flight bounds. While more requests wait in the
        buffer the reply is held, to go out with theirs in one send."""
        t0 = time.monotonic()
        write = req.type == p.Cmd.WRITE
        if write:
            # A fresh buffer per request, never reused: the backend may keep a view of it.
            payload = memoryview(bytearray(req.length))
            reader.read_into(payload, at_boundary=False)
        try:
            try:
                if write:
                    backend.pwrite(req.offset, payload, False)
                else:
                    backend.zero(req.offset, req.length, False)
            except Exception as e:  # noqa: BLE001 - refused as _handle refuses it
                self._refuse_request(conn, req, e)
                return
            if write:
                with conn.count_lock:
                    conn.info.bytes_written += req.length
            conn.reply(p.encode_simple_reply(p.Err.OK, req.cookie),
                       hold=reader.buffered() >= p.REQUEST_SIZE)
        except OSError as e:
            self._reply_lost(conn, req, e)
            return
        if self.on_request is not None:
            self.on_request(conn.info.export or "", _METRIC_NAME[req.type],
                            time.monotonic() - t0)

    def _serve(self, conn: _Conn, backend: Backend, req: p.Request,
               payload: bytearray | None, size: int, t0: float,
               later: bool = False) -> None:
        """Serve one validated request and reply (a worker thread, or the reader for an
        async FLUSH or a sync WRITE); ``size`` is what it holds of the connection's
        read-ahead, ``t0`` when its header was read, ``later``: a WRITE the backend
        completes later (``pwrite_then``)."""
        done = self._completion(conn, req, size, t0) if later else None
        pending = False
        try:
            pending = self._handle(conn, backend, req, payload, done)
            if self.on_request is not None and not pending:
                self.on_request(conn.info.export or "", _METRIC_NAME.get(req.type, "other"),
                                time.monotonic() - t0)
        except OSError as e:
            self._reply_lost(conn, req, e)
        except Exception:  # noqa: BLE001 - one request must not kill its worker silently
            self.log.exception("NBD %s: serving %s failed", conn.info.peer, _cmd_name(req.type))
            conn.closing = True
            _shutdown_socket(conn.sock)
        finally:
            if not pending:
                conn.inflight.release(size)

    def _completion(self, conn: _Conn, req: p.Request, size: int,
                    t0: float) -> Callable[[OSError | None], None]:
        """What replies to a WRITE the backend completes later (and releases its share of
        the read-ahead), on the thread that learns its outcome."""
        def done(error: OSError | None) -> None:
            try:
                if error is not None:
                    self._refuse_failed(conn, req, error)
                    return
                with conn.count_lock:
                    conn.info.bytes_written += req.length
                # Sent by the backend's ``then``, with the others it completes now.
                conn.reply(p.encode_simple_reply(p.Err.OK, req.cookie), hold=True)
                if self.on_request is not None:
                    self.on_request(conn.info.export or "", "write", time.monotonic() - t0)
            except OSError as e:
                self._reply_lost(conn, req, e)
            finally:
                conn.inflight.release(size)
        return done

    def _reply_lost(self, conn: _Conn, req: p.Request, e: OSError) -> None:
        """A reply could not be sent: the connection is gone; wake the reader."""
        if not conn.closing:
            self.log.warning("NBD %s: reply to %s failed: %s", conn.info.peer,
                             _cmd_name(req.type), e)
        conn.closing = True
        _shutdown_socket(conn.sock)

    def _refuse_request(self, conn: _Conn, req: p.Request, e: Exception) -> None:
        """Answer a request the backend raised ``e`` for: Shutdown ends the connection
        after an ESHUTDOWN reply, an OSError is its own NBD error, a bug is EIO."""
        if isinstance(e, Shutdown):
            self.log.warning("NBD %s: %s refused, backend shutting down (%s); disconnecting",
                             conn.info.peer, _cmd_name(req.type), e)
            with conn.send_lock:
                if not conn.closing:
                    conn._send_held()
                    conn.sock.sendall(conn.error_reply(p.Err.ESHUTDOWN, req.cookie,
                                                       "the server is shutting down"))
                    conn.closing = True
                    # FIN after the reply; the reader drains until the client closes.
                    _shutdown_socket(conn.sock, socket.SHUT_WR)
        elif isinstance(e, OSError):
            self._refuse_failed(conn, req, e)
        else:
            where = _where(req)
            self.log.error("NBD %s: %s failed: %s -> EIO", conn.info.peer, where, e,
                           exc_info=e)
            conn.reply(conn.error_reply(p.Err.EIO, req.cookie, f"{where}: server error"))

    def _refuse_failed(self, conn: _Conn, req: p.Request, e: OSError) -> None:
        """Answer a request the backend failed with the error's NBD code and reason."""
        where = _where(req)
        nbd_err = p.errno_to_nbd(e.errno)
        self.log.warning("NBD %s: %s failed: %s -> %s", conn.info.peer, where, e, nbd_err.name)
        # The client learns what failed, not the server's paths.
        reason = os.strerror(e.errno) if e.errno else "I/O error"
        conn.reply(conn.error_reply(nbd_err, req.cookie, f"{where}: {reason}"))

    def _handle(self, conn: _Conn, backend: Backend, req: p.Request,
                payload: bytearray | None,
                done: Callable[[OSError | None], None] | None = None) -> bool:
        """Serve ``req`` and reply; True when the reply is left to ``done``."""
        peer = conn.info.peer
        if (req.type == p.Cmd.WRITE_ZEROES and req.flags & p.CMD_FLAG_FAST_ZERO
                and not backend.zero_is_fast()):    # type: ignore[attr-defined]
            # Expected (qemu-img probes with it): the client falls back to writing zeros.
            self.log.debug("NBD %s: %s with FAST_ZERO: not fast here, ENOTSUP", peer,
                           _where(req))
            conn.reply(conn.error_reply(p.Err.ENOTSUP, req.cookie,
                                        "zeroing this export writes zeros: not fast"))
            return False
        after: Callable[[], None] | None = None
        try:
            if done is not None:
                assert payload is not None
                backend.pwrite_then(req.offset, memoryview(payload), done,  # type: ignore[attr-defined]
                                    conn.send_completed)
                return True
            if req.type == p.Cmd.FLUSH and getattr(backend, "quick_flush", False):
                after, chunks = backend.flush_local(), None  # type: ignore[attr-defined]
            else:
                chunks = self._call(conn, backend, req, payload)
        except Exception as e:  # noqa: BLE001 - every failure gets its reply
            self._refuse_request(conn, req, e)
            return False
        if chunks is None:
            conn.reply(p.encode_simple_reply(p.Err.OK, req.cookie))
        else:
            conn.reply_chunks(chunks)
        if after is not None:
            after()
        return False

    def _call(self, conn: _Conn, backend: Backend, req: p.Request,
              payload: bytearray | None) -> list[tuple[bytes, bytes | None]] | None:
        """Run a validated request against the backend; returns the reply's parts
        (header, data) for READ and BLOCK_STATUS, None for a simple OK."""
        fua = bool(req.flags & p.CMD_FLAG_FUA)
        kind, offset, length = req.type, req.offset, req.length
        if kind == p.Cmd.READ:
            chunks = self._read_reply(conn, backend, req, backend.pread)
            assert chunks is not None           # pread always reads
            return chunks
        if kind == p.Cmd.BLOCK_STATUS:
            limit = 1 if req.flags & p.CMD_FLAG_REQ_ONE else p.MAX_EXTENTS
            runs = _runs(backend, offset, length, limit)[:limit]
            return [(p.encode_block_status(p.REPLY_FLAG_DONE, req.cookie, p.BASE_ALLOCATION_ID,
                                           _descriptors(runs)), None)]
        if kind == p.Cmd.WRITE:
            assert payload is not None
            if length:
                backend.pwrite(offset, memoryview(payload), fua)
            with conn.count_lock:
                conn.info.bytes_written += length
        elif kind == p.Cmd.WRITE_ZEROES:
            if length:
                backend.zero(offset, length, fua)
        elif kind == p.Cmd.TRIM:
            if length:
                backend.trim(offset, length)
                if fua:
                    # The backend's trim has no FUA of its own: FUA asks for the trim to
                    # be durable before the reply, which a flush (of everything) gives.
                    backend.flush()
        elif kind == p.Cmd.FLUSH:
            backend.flush()
        elif kind == p.Cmd.CACHE:
            cache = getattr(backend, "cache", None)
            if cache is not None and length:
                cache(offset, length)       # a hint: without one, CACHE does nothing
        return None

    def _read_reply(self, conn: _Conn, backend: Backend, req: p.Request,
                    read: Callable[[int, int], bytes | None]
                    ) -> list[tuple[bytes, bytes | None]] | None:
        """A READ's reply, its data got with ``read`` (None: unread; then so is the reply,
        and nothing is counted). Structured: holes as OFFSET_HOLE (nothing read), data
        as OFFSET_DATA, the last chunk flagged DONE; with DF one data chunk, zeros
        included. Everything is read before anything is sent, so a failure is one ERROR
        chunk."""
        offset, length, cookie = req.offset, req.length, req.cookie
        if not conn.structured:
            data = _whole(read(offset, length), length) if length else b""
            if data is None:
                return None
            with conn.count_lock:       # counters shared by the workers
                conn.info.bytes_read += length
            return [(p.encode_simple_reply(p.Err.OK, cookie), data)]
        if not length:
            return [(p.encode_none_chunk(cookie), None)]
        if req.flags & p.CMD_FLAG_DF:
            runs = [(length, False)]
        else:
            runs = _runs(backend, offset, length, p.MAX_EXTENTS)
            covered = sum(n for n, _ in runs)
            if covered < length:        # past the backend's limit: sent as data
                runs.append((length - covered, False))
        chunks: list[tuple[bytes, bytes | None]] = []
        pos, holes = offset, 0
        for i, (n, hole) in enumerate(runs):
            flags = p.REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            if hole:
                chunks.append((p.encode_offset_hole(flags, cookie, pos, n), None))
                holes += n
            else:
                data = _whole(read(pos, n), n)
                if data is None:
                    return None
                chunks.append((p.encode_offset_data_header(flags, cookie, pos, n), data))
            pos += n
        with conn.count_lock:
            conn.info.bytes_read += length
            conn.info.bytes_holes += holes
        return chunks


def _whole(data: bytes | None, length: int) -> bytes | None:
    """``data`` a backend read for ``length`` bytes (None: not read); a short read is the
    backend's failure, EIO to the client."""
    if data is not None and len(data) != length:
        raise OSError(errno.EIO, f"backend returned {len(data)} of {length} bytes")
    return data


def transmission_flags(backend: Backend, structured: bool) -> int:
    """What an export advertises: the common flags, plus what the backend can do (fast
    zero, multi-conn) and what structured replies make possible (DF)."""
    flags = TRANSMISSION_FLAGS
    if structured:
        flags |= p.FLAG_SEND_DF
    if _can_fast_zero(backend):
        flags |= p.FLAG_SEND_FAST_ZERO
    if getattr(backend, "multi_conn", False):
        flags |= p.FLAG_CAN_MULTI_CONN
    return flags


def _can_fast_zero(backend: Backend) -> bool:
    return callable(getattr(backend, "zero_is_fast", None))


def _runs(backend: Backend, offset: int, length: int, limit: int) -> list[tuple[int, bool]]:
    """The backend's (length, hole) runs over a range (all data if it cannot tell),
    checked: at least one, none empty, within the range."""
    extents = getattr(backend, "extents", None)
    if extents is None:
        return [(length, False)]
    runs = list(extents(offset, length, limit))
    if not runs or any(n <= 0 for n, _ in runs) or sum(n for n, _ in runs) > length:
        raise OSError(errno.EIO, f"backend extents {runs[:4]!r} do not fit offset={offset} "
                                 f"length={length}")
    return runs


def _descriptors(runs: list[tuple[int, bool]]) -> list[tuple[int, int]]:
    """base:allocation descriptors: a hole is HOLE|ZERO, data 0; neighbours merged."""
    out: list[tuple[int, int]] = []
    for n, hole in runs:
        flags = p.STATE_HOLE | p.STATE_ZERO if hole else 0
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
    return out


# --- socket helpers -----------------------------------------------------------------------
def _recv_into(sock: socket.socket, buf: memoryview, at_boundary: bool) -> None:
    """Fill ``buf`` completely; EOF raises _PeerGone (mid-message unless nothing arrived
    and ``at_boundary``)."""
    done = 0
    while done < len(buf):
        try:
            n = sock.recv_into(buf[done:])
        except (ConnectionResetError, BrokenPipeError):
            n = 0
        if n == 0:
            raise _PeerGone(mid_message=done > 0 or not at_boundary)
        done += n


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    _recv_into(sock, memoryview(buf), at_boundary=False)
    return bytes(buf)


def _send_all(sock: socket.socket, header: bytes, data: bytes | None) -> None:
    # Small reads go out in one segment; large ones are not copied just to save a syscall.
    if data is None:
        sock.sendall(header)
    elif len(data) <= 64 * 1024:
        sock.sendall(header + data)
    else:
        sock.sendall(header)
        sock.sendall(data)


def host_port(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 address in brackets (as URIs and ``--nbd`` write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_unix(path: str) -> tuple[socket.socket, tuple[int, int]]:
    """A listening unix socket at ``path``, its file owner-only (whoever can connect can
    write the volume); returns it and the file's (device, inode). A socket file left by
    a server that died is replaced; anything else at ``path`` raises OSError (EEXIST,
    or EADDRINUSE while a server answers there): never removed."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, "a file that is not a socket is there", path)
        if _answers(path):
            raise OSError(errno.EADDRINUSE, "a server already listens there", path)
        os.unlink(path)                         # a dead server's: nobody listens
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux makes the file with the socket's own mode (less the umask): 0600 from the
        # start, where a chmod after bind would leave a moment open to all, and a umask
        # would be the whole process's, its other threads' files included.
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(path)
        sock.listen(64)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _answers(path: str) -> bool:
    """Does a server listen on the unix socket ``path``? Only a refusal (or the file
    gone meanwhile) says no: a server whose backlog is full keeps a connect waiting, and
    its socket must not be taken."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()


def _unlink_if(path: str | None, made: tuple[int, int]) -> None:
    """Remove the socket file at ``path`` if it is still the one this server made (a
    newer server may have replaced it meanwhile)."""
    try:
        st = os.stat(path) if path else None
        if st is not None and (st.st_dev, st.st_ino) == made:
            os.unlink(path)
    except OSError:
        pass    # gone already


_UCRED = struct.Struct("3i")


def _peer_name(sock: socket.socket, addr: object) -> str:
    """A client as logs name it: ``HOST:PORT``, or for a unix socket the connecting
    process (``unix:pid=N,uid=N``), which the kernel vouches for."""
    if sock.family != socket.AF_UNIX:
        return host_port(addr[0], addr[1])      # type: ignore[index]
    try:
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                    _UCRED.size))
    except OSError:
        return "unix:?"
    return f"unix:pid={pid},uid={uid}"


def _close_gracefully(sock: socket.socket, timeout: float = 1.0) -> None:
    """Send FIN, then drain what the client still sends for a moment: closing with unread
    data would send RST, and a RST can destroy replies the client has not read yet."""
    try:
        _shutdown_socket(sock, socket.SHUT_WR)
        sock.settimeout(timeout)
        scratch = bytearray(_DISCARD_CHUNK)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and sock.recv_into(scratch):
            pass
    except OSError:
        pass  # timed out or reset: the client had its chance


def _shutdown_socket(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    # socket.socket's own shutdown even for a TLS socket: SSLSocket.shutdown drops the
    # TLS state, and replies still sent during a graceful stop would go out in clear.
    try:
        socket.socket.shutdown(sock, how)
    except OSError:
        pass  # already closed or never connected


def _where(req: p.Request) -> str:
    return f"{_cmd_name(req.type)} offset={req.offset} length={req.length}"


#: A command's name in metrics, looked up per request without an enum call.
_METRIC_NAME = {int(c): c.name.lower() for c in p.Cmd}


def _cmd_name(kind: int) -> str:
    try:
        return f"NBD_CMD_{p.Cmd(kind).name}"
    except ValueError:
        return f"unknown command {kind}"


def _opt_name(option: int) -> str:
    try:
        return f"NBD_OPT_{p.Option(option).name}"
    except ValueError:
        return f"unknown option {option}"
