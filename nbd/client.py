"""A small NBD client: fixed newstyle handshake, NBD_OPT_GO, STARTTLS, simple replies.

x2x writes targets it does not hold as files through it: an image served by the
qemu-nbd x2x starts (qcow2, vmdk, vhdx, vdi), or any NBD server named by a URI (nbdkit
plugins, another host's qemu-nbd). Why our own: libnbd's Python binding is not on PyPI,
and Debian's python3-libnbd is built for Debian's interpreter, not the project's venv;
the protocol's encoders and parsers already live in :mod:`nbd.proto` (fuzzed), so the
client is only the socket loop around them.

One request is in flight at a time (replies come in order, so no cookie bookkeeping);
requests larger than the server's maximum are split. A lost connection raises
:class:`Disconnected`, which a caller may answer by reconnecting; an error the server
returns raises :class:`NBDError` with its errno. Stdlib only.
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from nbd import proto
from nbd.proto import Cmd, Option, Reply

DEFAULT_PORT = 10809
#: The largest request sent; qemu-nbd and nbdkit take 32 MiB, many servers less.
MAX_REQUEST = 4 << 20
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")


class NBDError(Exception):
    """The server refused an option or a request (``errno``: the request's error)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class Disconnected(ConnectionError):
    """The connection to the NBD server was lost (or could not be made)."""


@dataclass(frozen=True)
class Address:
    """What an NBD URI names (the libnbd/qemu URI form): ``nbd://host[:port]/export``,
    ``nbds://…`` for TLS, ``nbd+unix:///export?socket=PATH``; ``tls-certificates=DIR``
    in the query gives the client certificate directory (ca-cert.pem, client-cert.pem,
    client-key.pem)."""

    export: str
    host: str = ""
    port: int = DEFAULT_PORT
    socket_path: str = ""
    tls: bool = False
    certificates: str = ""

    def describe(self) -> str:
        where = f"unix:{self.socket_path}" if self.socket_path else f"{self.host}:{self.port}"
        return f"{where} export {self.export!r}" + (" (TLS)" if self.tls else "")


def is_uri(text: str) -> bool:
    return text.split("://", 1)[0] in SCHEMES and "://" in text


def parse_uri(uri: str) -> Address:
    """Parse an NBD URI; ValueError names what is wrong."""
    u = urlsplit(uri)
    if u.scheme not in SCHEMES:
        raise ValueError(f"{uri!r} is not an NBD URI (schemes: {', '.join(SCHEMES)})")
    query = parse_qs(u.query)
    export = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    tls = u.scheme.startswith("nbds")
    certs = query.get("tls-certificates", [""])[0]
    if u.scheme.endswith("+unix"):
        path = query.get("socket", [""])[0]
        if not path:
            raise ValueError(f"{uri!r}: an nbd+unix URI needs ?socket=PATH")
        return Address(export, socket_path=path, tls=tls, certificates=certs)
    if not u.hostname:
        raise ValueError(f"{uri!r}: no host (nbd://HOST[:PORT]/EXPORT)")
    try:
        port = u.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{uri!r}: the port is not a number") from None
    return Address(export, host=u.hostname, port=port, tls=tls, certificates=certs)


def tls_context(certificates: str) -> ssl.SSLContext:
    """A client context: the server checked against ``ca-cert.pem`` of the directory (or
    the system's CAs), and ``client-cert.pem``/``client-key.pem`` presented if present."""
    ctx = ssl.create_default_context()
    if certificates:
        ca = os.path.join(certificates, "ca-cert.pem")
        if os.path.exists(ca):
            ctx = ssl.create_default_context(cafile=ca)
        cert = os.path.join(certificates, "client-cert.pem")
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, os.path.join(certificates, "client-key.pem"))
    return ctx


class Client:
    """One connection to one export, in the transmission phase after :meth:`connect`."""

    def __init__(self, address: Address, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self.size = 0
        self.flags = 0
        self.max_request = MAX_REQUEST
        self._sock: socket.socket | ssl.SSLSocket | None = None
        self._lock = threading.Lock()
        self._cookie = 0

    # -- connection and handshake ----------------------------------------------------------
    @classmethod
    def open(cls, address: Address, timeout: float = 30.0) -> "Client":
        c = cls(address, timeout)
        c.connect()
        return c

    def connect(self) -> None:
        a = self.address
        try:
            if a.socket_path:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(self.timeout)
                s.connect(a.socket_path)
            else:
                s = socket.create_connection((a.host, a.port), self.timeout)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise Disconnected(f"cannot connect to NBD server {a.describe()}: "
                               f"{e.strerror or e}") from None
        self._sock = s
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        greeting = proto.parse_server_greeting(self._recv(proto.SERVER_GREETING_SIZE))
        if not greeting.flags & proto.FLAG_FIXED_NEWSTYLE:
            raise NBDError(f"NBD server {self.address.describe()} does not speak fixed "
                              f"newstyle")
        cflags = proto.FLAG_C_FIXED_NEWSTYLE
        if greeting.flags & proto.FLAG_NO_ZEROES:
            cflags |= proto.FLAG_C_NO_ZEROES
        self._send(proto.encode_client_flags(cflags))
        if self.address.tls:
            self._option(Option.STARTTLS)
            ctx = tls_context(self.address.certificates)
            host = self.address.host or None
            if host is None:
                ctx.check_hostname = False
            try:
                self._sock = ctx.wrap_socket(self._sock, server_hostname=host)
            except ssl.SSLError as e:
                raise NBDError(f"TLS with NBD server {self.address.describe()} failed: "
                               f"{e.reason or e}; name the directory holding its CA's "
                               f"ca-cert.pem (and client-cert.pem, client-key.pem) with "
                               f"?tls-certificates=DIR") from None
            except OSError as e:
                raise Disconnected(f"lost NBD server {self.address.describe()} during the "
                                   f"TLS handshake: {e.strerror or e}") from None
        self._go()

    def _go(self) -> None:
        name = self.address.export
        self._send(proto.encode_option_request(
            Option.GO, proto.encode_info_request(name, (proto.Info.BLOCK_SIZE,))))
        got_export = False
        while True:
            header, data = self._option_reply(Option.GO)
            if header.reply == Reply.ACK:
                break
            if header.reply == Reply.INFO:
                info = proto.parse_info_reply(data)
                if isinstance(info, proto.ExportInfo):
                    self.size, self.flags, got_export = info.size, info.flags, True
                elif isinstance(info, proto.BlockSize):
                    self.max_request = max(min(MAX_REQUEST, info.maximum), info.minimum, 512)
        if not got_export:
            raise NBDError(f"NBD server {self.address.describe()} did not tell the "
                              f"export's size")

    def _option(self, option: int, data: bytes = b"") -> bytes:
        self._send(proto.encode_option_request(option, data))
        header, reply = self._option_reply(option)
        if header.reply != Reply.ACK:
            raise NBDError(f"NBD server {self.address.describe()}: unexpected reply "
                              f"{header.reply} to option {option}")
        return reply

    def _option_reply(self, option: int) -> tuple[proto.OptionReplyHeader, bytes]:
        header = proto.parse_option_reply_header(self._recv(proto.OPTION_REPLY_HEADER_SIZE))
        if header.length > proto.MAX_OPTION_DATA:
            raise NBDError(f"option reply of {header.length} bytes is too large")
        data = self._recv(header.length) if header.length else b""
        if header.reply & (1 << 31):
            raise NBDError(self._option_error(option, header.reply, data))
        return header, data

    def _option_error(self, option: int, reply: int, data: bytes) -> str:
        a = self.address
        text = data.decode("utf-8", "replace")
        try:
            kind = Reply(reply).name
        except ValueError:
            kind = f"error {reply:#x}"
        if reply == Reply.ERR_TLS_REQD:
            return f"NBD server {a.describe()} requires TLS: use an nbds:// URI"
        if reply == Reply.ERR_UNKNOWN:
            return f"NBD server {a.host or a.socket_path} has no export {a.export!r}"
        if option == Option.STARTTLS:
            return f"NBD server {a.describe()} does not offer TLS ({kind}): use nbd://"
        return f"NBD server {a.describe()} refused option {option}: {kind} {text}".strip()

    # -- transmission --------------------------------------------------------------------
    def can(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.readinto(offset, memoryview(out))
        return bytes(out)

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = min(self.max_request, len(buf) - done)
            with self._lock:
                self._request(Cmd.READ, offset + done, n)
                self._recv_into(buf[done:done + n])
            done += n

    def pwrite(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for start in range(0, len(view), self.max_request):
            part = view[start:start + self.max_request]
            with self._lock:
                self._request(Cmd.WRITE, offset + start, len(part), payload=part)
                self._reply(Cmd.WRITE, offset + start)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True) -> None:
        """NBD_CMD_WRITE_ZEROES; ``may_trim`` lets the server deallocate (no NO_HOLE)."""
        self._ranged(Cmd.WRITE_ZEROES, offset, length, 0 if may_trim else proto.CMD_FLAG_NO_HOLE)

    def trim(self, offset: int, length: int) -> None:
        self._ranged(Cmd.TRIM, offset, length, 0)

    def flush(self) -> None:
        with self._lock:
            self._request(Cmd.FLUSH, 0, 0)
            self._reply(Cmd.FLUSH, 0)

    def _ranged(self, cmd: Cmd, offset: int, length: int, flags: int) -> None:
        step = 1 << 30          # lengths are 32 bits; stay well inside
        for start in range(offset, offset + length, step):
            n = min(step, offset + length - start)
            with self._lock:
                self._request(cmd, start, n, flags)
                self._reply(cmd, start)

    def close(self) -> None:
        s, self._sock = self._sock, None
        if s is None:
            return
        try:
            s.sendall(proto.encode_request(proto.Request(0, Cmd.DISC, 0, 0, 0)))
        except OSError:
            pass
        try:
            s.close()
        except OSError:
            pass

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- wire ----------------------------------------------------------------------------
    def _request(self, cmd: Cmd, offset: int, length: int, flags: int = 0,
                 payload: memoryview | None = None) -> None:
        self._cookie += 1
        header = proto.encode_request(proto.Request(flags, cmd, self._cookie, offset, length))
        self._send(header if payload is None else header + bytes(payload))

    def _reply(self, cmd: Cmd, offset: int) -> None:
        r = proto.parse_simple_reply(self._recv(proto.SIMPLE_REPLY_SIZE))
        if r.cookie != self._cookie:
            raise Disconnected(f"NBD server {self.address.describe()} answered request "
                               f"{r.cookie}, expected {self._cookie}")
        if r.error:
            raise NBDError(f"NBD server {self.address.describe()}: {cmd.name} at offset "
                           f"{offset} failed: {os.strerror(r.error)}", r.error)

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise Disconnected(f"not connected to NBD server {self.address.describe()}")
        try:
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise Disconnected(f"lost NBD server {self.address.describe()}: "
                               f"{e.strerror or e}") from None

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_raw(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        r = proto.parse_simple_reply(self._recv(proto.SIMPLE_REPLY_SIZE))
        if r.error:
            raise NBDError(f"NBD server {self.address.describe()}: READ failed: "
                           f"{os.strerror(r.error)}", r.error)
        self._recv_raw(view)

    def _recv_raw(self, view: memoryview) -> None:
        if self._sock is None:
            raise Disconnected(f"not connected to NBD server {self.address.describe()}")
        got = 0
        try:
            while got < len(view):
                n = self._sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionResetError(0, "closed by the server")
                got += n
        except OSError as e:
            self.close()
            raise Disconnected(f"lost NBD server {self.address.describe()}: "
                               f"{getattr(e, 'strerror', None) or e}") from None
