"""The NBD wire protocol, as pure functions over bytes (no sockets, no I/O).

Follows upstream NBD ``doc/proto.md``: fixed newstyle handshake, option haggling
(structured replies, the ``base:allocation`` metadata context), and the transmission
phase with simple replies and structured reply chunks. Every parser takes exactly the bytes
of one message part and either returns a dataclass or raises :class:`ProtocolError`;
nothing else may escape, so the parsers can be fuzzed. Encoders for both directions
exist so tests can play the client and round-trip every message.

All integers are big-endian ("network byte order") as the protocol requires.
"""
from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from enum import IntEnum

# --- magics -----------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71

# --- handshake flags (server, 16 bit) and client flags (32 bit) ---------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# --- transmission flags (16 bit) ----------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

# --- command flags (16 bit) ---------------------------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# --- structured replies -------------------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
# base:allocation status flags of a block status descriptor.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
#: The one metadata context we serve, and the id NBD_OPT_SET_META_CONTEXT gives it.
META_BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

# --- sizes --------------------------------------------------------------------------------
SERVER_GREETING_SIZE = 18  # NBDMAGIC + IHAVEOPT + handshake flags
CLIENT_FLAGS_SIZE = 4
OPTION_HEADER_SIZE = 16  # IHAVEOPT + option + length
OPTION_REPLY_HEADER_SIZE = 20  # magic + option + reply type + length
REQUEST_SIZE = 28
SIMPLE_REPLY_SIZE = 16
CHUNK_HEADER_SIZE = 20  # magic + flags + type + cookie + payload length
MAX_META_QUERIES = 64   # more queries in one option are refused (ERR_TOO_BIG)
EXPORT_NAME_REPLY_SIZE = 10  # size + transmission flags, then 124 zeroes unless NO_ZEROES
EXPORT_NAME_PADDING = 124
MAX_STRING = 4096  # proto.md: strings MUST be no longer than 4096 bytes
MAX_OPTION_DATA = 64 * 1024  # larger option payloads are refused; no option needs more

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR = struct.Struct(">IH")
_DESCRIPTOR = struct.Struct(">II")


class ProtocolError(Exception):
    """Bytes from the peer that do not form a valid NBD message."""


class TooBig(ProtocolError):
    """A well-formed option asking for more than the server serves (NBD_REP_ERR_TOO_BIG)."""


class Option(IntEnum):
    """Option numbers sent by the client during option haggling."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERR = 1 << 31


class Reply(IntEnum):
    """Option reply types; values with bit 31 set are errors."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR | 1
    ERR_POLICY = _REP_ERR | 2
    ERR_INVALID = _REP_ERR | 3
    ERR_PLATFORM = _REP_ERR | 4
    ERR_TLS_REQD = _REP_ERR | 5
    ERR_UNKNOWN = _REP_ERR | 6
    ERR_SHUTDOWN = _REP_ERR | 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR | 8
    ERR_TOO_BIG = _REP_ERR | 9
    ERR_EXT_HEADER_REQD = _REP_ERR | 10


class Info(IntEnum):
    """Information types carried by NBD_REP_INFO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Transmission-phase request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class ReplyType(IntEnum):
    """Structured reply chunk types; bit 15 marks error chunks."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


REPLY_TYPE_ERROR_BIT = 1 << 15


class Err(IntEnum):
    """Error values of transmission replies (numerically equal to Linux errnos)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# The protocol defines only these errors; anything else a backend raises becomes EIO.
_ERRNO_TO_NBD: dict[int, Err] = {
    _errno.EPERM: Err.EPERM,
    _errno.EACCES: Err.EPERM,
    _errno.EROFS: Err.EPERM,
    _errno.EIO: Err.EIO,
    _errno.ENOMEM: Err.ENOMEM,
    _errno.EINVAL: Err.EINVAL,
    _errno.ENOSPC: Err.ENOSPC,
    _errno.EFBIG: Err.ENOSPC,
    _errno.EDQUOT: Err.ENOSPC,
    _errno.EOVERFLOW: Err.EOVERFLOW,
    _errno.ENOTSUP: Err.ENOTSUP,
    _errno.EOPNOTSUPP: Err.ENOTSUP,
    _errno.ESHUTDOWN: Err.ESHUTDOWN,
}


def errno_to_nbd(err: int | None) -> Err:
    """Map an OS errno to the NBD error code sent in a reply (EIO when unknown)."""
    return _ERRNO_TO_NBD.get(err or 0, Err.EIO)


# --- records ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerGreeting:
    """The server's first message: the two magics and its handshake flags."""

    flags: int


@dataclass(frozen=True)
class OptionHeader:
    """An option request's header; ``length`` bytes of option data follow it."""

    option: int
    length: int


@dataclass(frozen=True)
class OptionReplyHeader:
    """An option reply's header; ``length`` bytes of reply data follow it."""

    option: int
    reply: int
    length: int


@dataclass(frozen=True)
class InfoRequest:
    """The data of NBD_OPT_INFO / NBD_OPT_GO: an export name and requested info types."""

    name: str
    info_types: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExportInfo:
    """Export size and transmission flags (NBD_INFO_EXPORT, or the EXPORT_NAME reply)."""

    size: int
    flags: int


@dataclass(frozen=True)
class BlockSize:
    """NBD_INFO_BLOCK_SIZE constraints, in bytes."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True)
class Request:
    """A transmission-phase request header; a WRITE's ``length`` bytes of payload follow."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int


@dataclass(frozen=True)
class SimpleReply:
    """A simple reply header; a successful READ's payload follows it."""

    error: int
    cookie: int


@dataclass(frozen=True)
class MetaContextRequest:
    """The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""

    name: str
    queries: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkHeader:
    """A structured reply chunk's header; ``length`` bytes of payload follow it."""

    flags: int
    type: int
    cookie: int
    length: int


@dataclass(frozen=True)
class OffsetData:
    """NBD_REPLY_TYPE_OFFSET_DATA: ``data`` read at ``offset``."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class OffsetHole:
    """NBD_REPLY_TYPE_OFFSET_HOLE: ``size`` bytes at ``offset`` read as zeros."""

    offset: int
    size: int


@dataclass(frozen=True)
class BlockStatus:
    """NBD_REPLY_TYPE_BLOCK_STATUS: (length, status flags) descriptors from the request's
    offset on, for metadata context ``context``."""

    context: int
    extents: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ErrorChunk:
    """NBD_REPLY_TYPE_ERROR (``offset`` None) or NBD_REPLY_TYPE_ERROR_OFFSET."""

    error: int
    message: str
    offset: int | None = None


# --- helpers ------------------------------------------------------------------------------
def _exact(data: bytes | memoryview, size: int, what: str) -> None:
    if len(data) != size:
        raise ProtocolError(f"{what}: expected {size} bytes, got {len(data)}")


def _decode_name(raw: bytes | memoryview, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise ProtocolError(f"{what}: {len(raw)} bytes, longer than {MAX_STRING}")
    try:
        name = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8") from None
    if "\x00" in name:
        raise ProtocolError(f"{what} contains NUL")
    return name


def _encode_name(name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > MAX_STRING or "\x00" in name:
        raise ValueError(f"invalid NBD string {name!r}")
    return raw


# --- handshake ----------------------------------------------------------------------------
def encode_server_greeting(flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> bytes:
    """The newstyle greeting: NBDMAGIC, IHAVEOPT and 16-bit handshake flags."""
    return _GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def parse_server_greeting(data: bytes | memoryview) -> ServerGreeting:
    """Client side of :func:`encode_server_greeting`."""
    _exact(data, SERVER_GREETING_SIZE, "server greeting")
    magic, opt, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise ProtocolError(f"not a newstyle NBD greeting ({magic:#x}, {opt:#x})")
    return ServerGreeting(flags)


def encode_client_flags(flags: int) -> bytes:
    """The client's 32-bit answer to the greeting."""
    return _U32.pack(flags)


def parse_client_flags(data: bytes | memoryview) -> int:
    """Client flags; unknown bits are an error (the spec says the server must close)."""
    _exact(data, CLIENT_FLAGS_SIZE, "client flags")
    (flags,) = _U32.unpack(data)
    if flags & ~KNOWN_CLIENT_FLAGS:
        raise ProtocolError(f"unknown client flags {flags & ~KNOWN_CLIENT_FLAGS:#x}")
    if not flags & FLAG_C_FIXED_NEWSTYLE:
        raise ProtocolError("client does not speak fixed newstyle")
    return flags


# --- option haggling ----------------------------------------------------------------------
def encode_option_request(option: int, data: bytes = b"") -> bytes:
    """A client option request: IHAVEOPT, option, length, data."""
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def parse_option_header(data: bytes | memoryview) -> OptionHeader:
    """Header of an option request; a bad magic or an oversized length is an error."""
    _exact(data, OPTION_HEADER_SIZE, "option header")
    magic, option, length = _OPTION_HEADER.unpack(data)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    if length > MAX_OPTION_DATA:
        raise ProtocolError(f"option {option} data of {length} bytes exceeds {MAX_OPTION_DATA}")
    return OptionHeader(option, length)


def encode_export_name(name: str) -> bytes:
    """Data of NBD_OPT_EXPORT_NAME: the bare name."""
    return _encode_name(name)


def parse_export_name(data: bytes | memoryview) -> str:
    """Data of NBD_OPT_EXPORT_NAME."""
    return _decode_name(data, "export name")


def encode_info_request(name: str, info_types: tuple[int, ...] = ()) -> bytes:
    """Data of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = _encode_name(name)
    types = b"".join(_U16.pack(t) for t in info_types)
    return _U32.pack(len(raw)) + raw + _U16.pack(len(info_types)) + types


def parse_info_request(data: bytes | memoryview) -> InfoRequest:
    """Data of NBD_OPT_INFO / NBD_OPT_GO; any length inconsistency is an error."""
    view = memoryview(data)
    if len(view) < 6:
        raise ProtocolError(f"info request of {len(view)} bytes is too short")
    (name_len,) = _U32.unpack(view[:4])
    if name_len > len(view) - 6:
        raise ProtocolError(f"info request name length {name_len} exceeds its data")
    name = _decode_name(view[4:4 + name_len], "export name")
    rest = view[4 + name_len:]
    (count,) = _U16.unpack(rest[:2])
    if len(rest) != 2 + 2 * count:
        raise ProtocolError(f"info request lists {count} types in {len(rest) - 2} bytes")
    types = struct.unpack(f">{count}H", rest[2:])
    return InfoRequest(name, types)


def encode_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    """A server option reply: magic, option, reply type, length, data."""
    return _OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def parse_option_reply_header(data: bytes | memoryview) -> OptionReplyHeader:
    """Client side of :func:`encode_option_reply` (header only)."""
    _exact(data, OPTION_REPLY_HEADER_SIZE, "option reply header")
    magic, option, reply, length = _OPTION_REPLY_HEADER.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(option, reply, length)


def encode_rep_server(name: str, description: str = "") -> bytes:
    """Data of NBD_REP_SERVER (one export in an NBD_OPT_LIST answer)."""
    raw = _encode_name(name)
    return _U32.pack(len(raw)) + raw + _encode_name(description)


def parse_rep_server(data: bytes | memoryview) -> tuple[str, str]:
    """Data of NBD_REP_SERVER: (name, description)."""
    view = memoryview(data)
    if len(view) < 4:
        raise ProtocolError("NBD_REP_SERVER data too short")
    (name_len,) = _U32.unpack(view[:4])
    if name_len > len(view) - 4:
        raise ProtocolError(f"NBD_REP_SERVER name length {name_len} exceeds its data")
    return (_decode_name(view[4:4 + name_len], "export name"),
            _decode_name(view[4 + name_len:], "export description"))


def encode_info_export(info: ExportInfo) -> bytes:
    """Data of NBD_REP_INFO carrying NBD_INFO_EXPORT."""
    return _INFO_EXPORT.pack(Info.EXPORT, info.size, info.flags)


def encode_info_block_size(bs: BlockSize) -> bytes:
    """Data of NBD_REP_INFO carrying NBD_INFO_BLOCK_SIZE."""
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, bs.minimum, bs.preferred, bs.maximum)


def parse_info_reply(data: bytes | memoryview) -> ExportInfo | BlockSize | tuple[int, bytes]:
    """Data of NBD_REP_INFO; types other than EXPORT and BLOCK_SIZE come back raw."""
    view = memoryview(data)
    if len(view) < 2:
        raise ProtocolError("NBD_REP_INFO data too short")
    (kind,) = _U16.unpack(view[:2])
    if kind == Info.EXPORT:
        _exact(view, _INFO_EXPORT.size, "NBD_INFO_EXPORT")
        _, size, flags = _INFO_EXPORT.unpack(view)
        return ExportInfo(size, flags)
    if kind == Info.BLOCK_SIZE:
        _exact(view, _INFO_BLOCK_SIZE.size, "NBD_INFO_BLOCK_SIZE")
        _, minimum, preferred, maximum = _INFO_BLOCK_SIZE.unpack(view)
        return BlockSize(minimum, preferred, maximum)
    return kind, bytes(view[2:])


def encode_export_name_reply(info: ExportInfo, no_zeroes: bool) -> bytes:
    """Successful answer to NBD_OPT_EXPORT_NAME: size, flags, then padding unless NO_ZEROES."""
    body = _EXPORT_NAME_REPLY.pack(info.size, info.flags)
    return body if no_zeroes else body + bytes(EXPORT_NAME_PADDING)


def parse_export_name_reply(data: bytes | memoryview) -> ExportInfo:
    """Client side of :func:`encode_export_name_reply` (the first 10 bytes)."""
    _exact(data, EXPORT_NAME_REPLY_SIZE, "export name reply")
    size, flags = _EXPORT_NAME_REPLY.unpack(data)
    return ExportInfo(size, flags)


# --- transmission -------------------------------------------------------------------------
def encode_request(req: Request) -> bytes:
    """A request header (a WRITE's payload is sent after it)."""
    return _REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def parse_request(data: bytes | memoryview) -> Request:
    """A request header; a wrong magic (incl. extended headers, never negotiated) is an error."""
    _exact(data, REQUEST_SIZE, "request header")
    magic, flags, kind, cookie, offset, length = _REQUEST.unpack(data)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, kind, cookie, offset, length)


def encode_simple_reply(error: int, cookie: int) -> bytes:
    """A simple reply header (a successful READ's data is sent after it)."""
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def parse_simple_reply(data: bytes | memoryview) -> SimpleReply:
    """Client side of :func:`encode_simple_reply`."""
    _exact(data, SIMPLE_REPLY_SIZE, "simple reply")
    magic, error, cookie = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad reply magic {magic:#x}")
    return SimpleReply(error, cookie)


# --- option haggling: metadata contexts ----------------------------------------------------
def encode_meta_context_request(name: str, queries: tuple[str, ...] = ()) -> bytes:
    """Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = _encode_name(name)
    parts = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for q in queries:
        rq = _encode_name(q)
        parts += [_U32.pack(len(rq)), rq]
    return b"".join(parts)


def parse_meta_context_request(data: bytes | memoryview) -> MetaContextRequest:
    """Data of the META_CONTEXT options: every length must match the data exactly, and
    at most :data:`MAX_META_QUERIES` queries (more is :class:`TooBig`)."""
    view = memoryview(data)
    if len(view) < 8:
        raise ProtocolError(f"meta context request of {len(view)} bytes is too short")
    (name_len,) = _U32.unpack(view[:4])
    if name_len > len(view) - 8:
        raise ProtocolError(f"meta context export name length {name_len} exceeds its data")
    name = _decode_name(view[4:4 + name_len], "export name")
    at = 4 + name_len
    (count,) = _U32.unpack(view[at:at + 4])
    at += 4
    if count > MAX_META_QUERIES:
        raise TooBig(f"{count} meta context queries, more than {MAX_META_QUERIES}")
    queries = []
    for i in range(count):
        if len(view) - at < 4:
            raise ProtocolError(f"meta context query {i + 1} of {count} is missing")
        (qlen,) = _U32.unpack(view[at:at + 4])
        at += 4
        if qlen > len(view) - at:
            raise ProtocolError(f"meta context query length {qlen} exceeds its data")
        queries.append(_decode_name(view[at:at + qlen], "meta context query"))
        at += qlen
    if at != len(view):
        raise ProtocolError(f"{len(view) - at} bytes after the last meta context query")
    return MetaContextRequest(name, tuple(queries))


def match_meta_contexts(queries: tuple[str, ...], available: tuple[str, ...],
                        listing: bool) -> list[str]:
    """The contexts a LIST or SET selects. LIST with no query lists them all, and a bare
    namespace (``base:``) lists that namespace; SET selects exact names only. A query we
    do not know selects nothing (not an error, as proto.md says)."""
    if listing and not queries:
        return list(available)
    chosen = []
    for q in queries:
        for ctx in available:
            exact = q == ctx
            namespace = listing and q.endswith(":") and ctx.startswith(q)
            if (exact or namespace) and ctx not in chosen:
                chosen.append(ctx)
    return chosen


def encode_rep_meta_context(context: int, name: str) -> bytes:
    """Data of NBD_REP_META_CONTEXT: context id and name."""
    return _U32.pack(context) + _encode_name(name)


def parse_rep_meta_context(data: bytes | memoryview) -> tuple[int, str]:
    """Data of NBD_REP_META_CONTEXT: (context id, name)."""
    view = memoryview(data)
    if len(view) < 5:
        raise ProtocolError("NBD_REP_META_CONTEXT data too short")
    (context,) = _U32.unpack(view[:4])
    return context, _decode_name(view[4:], "meta context name")


# --- transmission: structured reply chunks ----------------------------------------------------
def encode_chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    """A structured reply chunk header; ``length`` bytes of payload follow it."""
    return _CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def encode_offset_data_header(flags: int, cookie: int, offset: int, size: int) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; its ``size`` data bytes are sent after
    it (not copied in)."""
    return encode_chunk_header(flags, ReplyType.OFFSET_DATA, cookie, 8 + size) + \
        _U64.pack(offset)


def encode_offset_hole(flags: int, cookie: int, offset: int, size: int) -> bytes:
    """A whole OFFSET_HOLE chunk: ``size`` (nonzero) bytes at ``offset`` read as zeros."""
    return encode_chunk_header(flags, ReplyType.OFFSET_HOLE, cookie, _HOLE.size) + \
        _HOLE.pack(offset, size)


def encode_block_status(flags: int, cookie: int, context: int,
                        extents: list[tuple[int, int]]) -> bytes:
    """A whole BLOCK_STATUS chunk: (length, status flags) descriptors."""
    body = _U32.pack(context) + b"".join(_DESCRIPTOR.pack(n, f) for n, f in extents)
    return encode_chunk_header(flags, ReplyType.BLOCK_STATUS, cookie, len(body)) + body


def encode_error_chunk(flags: int, cookie: int, error: int, message: str = "") -> bytes:
    """A whole ERROR chunk: a nonzero NBD error and a message for humans (cut to the
    4096-byte string limit, on a character boundary)."""
    raw = message.replace("\x00", " ").encode("utf-8")[:MAX_STRING]
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    body = _ERROR.pack(error, len(raw)) + raw
    return encode_chunk_header(flags, ReplyType.ERROR, cookie, len(body)) + body


def encode_none_chunk(cookie: int) -> bytes:
    """The NONE chunk that ends a structured reply."""
    return encode_chunk_header(REPLY_FLAG_DONE, ReplyType.NONE, cookie, 0)


def parse_chunk_header(data: bytes | memoryview) -> ChunkHeader:
    """Client side of :func:`encode_chunk_header`."""
    _exact(data, CHUNK_HEADER_SIZE, "structured reply chunk header")
    magic, flags, kind, cookie, length = _CHUNK_HEADER.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic {magic:#x}")
    return ChunkHeader(flags, kind, cookie, length)


def parse_chunk_payload(kind: int, data: bytes | memoryview
                        ) -> OffsetData | OffsetHole | BlockStatus | ErrorChunk | None:
    """A chunk's payload by its type, with every length rule of proto.md checked; an
    unknown type is an error (an unknown error type too: its payload is not ours to read)."""
    view = memoryview(data)
    if kind == ReplyType.NONE:
        if len(view):
            raise ProtocolError(f"NONE chunk with {len(view)} bytes of payload")
        return None
    if kind == ReplyType.OFFSET_DATA:
        if len(view) < 9:
            raise ProtocolError(f"OFFSET_DATA chunk of {len(view)} bytes (at least 9)")
        return OffsetData(_U64.unpack(view[:8])[0], bytes(view[8:]))
    if kind == ReplyType.OFFSET_HOLE:
        _exact(view, _HOLE.size, "OFFSET_HOLE chunk")
        offset, size = _HOLE.unpack(view)
        if size == 0:
            raise ProtocolError("OFFSET_HOLE chunk of size 0")
        return OffsetHole(offset, size)
    if kind == ReplyType.BLOCK_STATUS:
        if len(view) < 12 or (len(view) - 4) % 8:
            raise ProtocolError(f"BLOCK_STATUS chunk of {len(view)} bytes (4 + 8n, n >= 1)")
        (context,) = _U32.unpack(view[:4])
        extents = tuple(_DESCRIPTOR.iter_unpack(view[4:]))
        if any(n == 0 for n, _ in extents):
            raise ProtocolError("BLOCK_STATUS descriptor of length 0")
        return BlockStatus(context, extents)
    if kind in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        tail = 8 if kind == ReplyType.ERROR_OFFSET else 0
        if len(view) < _ERROR.size + tail:
            raise ProtocolError(f"error chunk of {len(view)} bytes is too short")
        error, mlen = _ERROR.unpack(view[:_ERROR.size])
        if error == 0:
            raise ProtocolError("error chunk with error 0")
        if mlen != len(view) - _ERROR.size - tail:
            raise ProtocolError(f"error chunk message length {mlen} does not match its data")
        message = _decode_name(view[_ERROR.size:_ERROR.size + mlen], "error message")
        offset = _U64.unpack(view[-8:])[0] if tail else None
        return ErrorChunk(error, message, offset)
    raise ProtocolError(f"unknown structured reply type {kind}")


# --- request validation -------------------------------------------------------------------
MAX_PAYLOAD = 32 * 1024 * 1024  # the largest READ/WRITE we serve (advertised as max block)
BLOCK_SIZE = BlockSize(minimum=1, preferred=4096, maximum=MAX_PAYLOAD)

#: The most descriptors one BLOCK_STATUS chunk carries, and content chunks one READ
#: reply splits into; the rest of the range is answered by the client's next request
#: (BLOCK_STATUS) or sent as data (READ).
MAX_EXTENTS = 1024

# Flags each command may carry once negotiated. FUA is accepted on every command because
# proto.md lets clients set it anywhere; DF needs structured replies, FAST_ZERO the
# export's NBD_FLAG_SEND_FAST_ZERO (see request_error).
_ALLOWED_FLAGS: dict[int, int] = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}


def request_error(req: Request, export_size: int, *, structured: bool = False,
                  block_status: bool = False, fast_zero: bool = False) -> tuple[Err, str]:
    """The error a well-framed request deserves before it reaches the backend and why,
    or (OK, ""). ``structured``, ``block_status`` and ``fast_zero`` say what the
    connection negotiated (structured replies, a metadata context, the export's
    NBD_FLAG_SEND_FAST_ZERO); a flag or command that needs one of them is EINVAL without.

    Writes past the end get ENOSPC and other out-of-range requests EINVAL, as proto.md
    asks; unknown commands are EINVAL.
    """
    allowed = _ALLOWED_FLAGS.get(req.type)
    if allowed is None:
        return Err.EINVAL, f"unknown command {req.type}"
    if req.type == Cmd.BLOCK_STATUS and not block_status:
        return Err.EINVAL, (f"{_cmd(req.type)} without a metadata context: negotiate "
                            f"{META_BASE_ALLOCATION} with NBD_OPT_SET_META_CONTEXT first")
    if not structured:
        allowed &= ~CMD_FLAG_DF
    if not fast_zero:
        allowed &= ~CMD_FLAG_FAST_ZERO
    if req.flags & ~allowed:
        return Err.EINVAL, (f"command flags {req.flags & ~allowed:#x} are not valid on "
                            f"{_cmd(req.type)}")
    if req.type in (Cmd.DISC, Cmd.FLUSH):
        return Err.OK, ""
    if req.type in (Cmd.READ, Cmd.WRITE) and req.length > MAX_PAYLOAD:
        return (Err.EINVAL if req.type == Cmd.READ else Err.EOVERFLOW,
                f"{_cmd(req.type)} of {req.length} bytes exceeds the maximum of "
                f"{MAX_PAYLOAD}")
    if req.type == Cmd.BLOCK_STATUS and req.length == 0:
        return Err.EINVAL, f"{_cmd(req.type)} of length 0"
    if req.offset + req.length > export_size:
        err = Err.ENOSPC if req.type in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Err.EINVAL
        return err, (f"{_cmd(req.type)} offset={req.offset} length={req.length} goes "
                     f"past the end of the export ({export_size} bytes)")
    return Err.OK, ""


def check_request(req: Request, export_size: int, **negotiated: bool) -> Err:
    """The error of :func:`request_error` alone."""
    return request_error(req, export_size, **negotiated)[0]


def _cmd(kind: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(kind).name}"
    except ValueError:
        return f"command {kind}"
