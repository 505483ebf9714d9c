"""The pure NBD wire layer: every encoder round-trips through its parser, and any bytes at
all (random, truncated, mutated) yield either a value or a clean ProtocolError."""
from __future__ import annotations

import errno
from typing import Any, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd import proto as p
from tests.fuzz import count

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
# Export names: any UTF-8 text without NUL, within the 4096-byte string limit.
names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=200)

requests = st.builds(p.Request, flags=u16, type=u16, cookie=u64, offset=u64, length=u32)
info_requests = st.builds(p.InfoRequest, name=names,
                          info_types=st.lists(u16, max_size=20).map(tuple))


# --- round trips --------------------------------------------------------------------------
@given(u16)
def test_server_greeting_round_trips(flags: int) -> None:
    data = p.encode_server_greeting(flags)
    assert len(data) == p.SERVER_GREETING_SIZE
    assert data[:8] == b"NBDMAGIC" and data[8:16] == b"IHAVEOPT"
    assert p.parse_server_greeting(data) == p.ServerGreeting(flags)


@given(st.sampled_from([p.FLAG_C_FIXED_NEWSTYLE, p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES]))
def test_known_client_flags_round_trip(flags: int) -> None:
    assert p.parse_client_flags(p.encode_client_flags(flags)) == flags


@given(u32.filter(lambda f: f & ~p.KNOWN_CLIENT_FLAGS))
def test_unknown_client_flags_are_refused(flags: int) -> None:
    with pytest.raises(p.ProtocolError, match="unknown client flags"):
        p.parse_client_flags(p.encode_client_flags(flags))


def test_client_without_fixed_newstyle_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="fixed newstyle"):
        p.parse_client_flags(p.encode_client_flags(p.FLAG_C_NO_ZEROES))


@given(u32, st.binary(max_size=300))
def test_option_request_round_trips(option: int, data: bytes) -> None:
    raw = p.encode_option_request(option, data)
    header = p.parse_option_header(raw[:p.OPTION_HEADER_SIZE])
    assert header == p.OptionHeader(option, len(data))
    assert raw[p.OPTION_HEADER_SIZE:] == data


def test_option_data_over_64k_is_refused() -> None:
    raw = p.encode_option_request(p.Option.GO, b"")[:12] + (p.MAX_OPTION_DATA + 1).to_bytes(4, "big")
    with pytest.raises(p.ProtocolError, match="exceeds"):
        p.parse_option_header(raw)


@given(names)
def test_export_name_round_trips(name: str) -> None:
    assert p.parse_export_name(p.encode_export_name(name)) == name


@given(info_requests)
def test_info_request_round_trips(req: p.InfoRequest) -> None:
    assert p.parse_info_request(p.encode_info_request(req.name, req.info_types)) == req


@given(u32, u32, st.binary(max_size=300))
def test_option_reply_round_trips(option: int, reply: int, data: bytes) -> None:
    raw = p.encode_option_reply(option, reply, data)
    assert p.parse_option_reply_header(raw[:p.OPTION_REPLY_HEADER_SIZE]) == \
        p.OptionReplyHeader(option, reply, len(data))
    assert raw[p.OPTION_REPLY_HEADER_SIZE:] == data


@given(names, names)
def test_rep_server_round_trips(name: str, description: str) -> None:
    assert p.parse_rep_server(p.encode_rep_server(name, description)) == (name, description)


@given(u64, u16)
def test_info_export_round_trips(size: int, flags: int) -> None:
    info = p.ExportInfo(size, flags)
    assert p.parse_info_reply(p.encode_info_export(info)) == info


@given(u32, u32, u32)
def test_info_block_size_round_trips(a: int, b: int, c: int) -> None:
    bs = p.BlockSize(a, b, c)
    assert p.parse_info_reply(p.encode_info_block_size(bs)) == bs


@given(u64, u16, st.booleans())
def test_export_name_reply_round_trips(size: int, flags: int, no_zeroes: bool) -> None:
    info = p.ExportInfo(size, flags)
    raw = p.encode_export_name_reply(info, no_zeroes)
    # Without NO_ZEROES the spec pads with exactly 124 zero bytes.
    assert len(raw) == p.EXPORT_NAME_REPLY_SIZE + (0 if no_zeroes else p.EXPORT_NAME_PADDING)
    assert raw[p.EXPORT_NAME_REPLY_SIZE:] == bytes(len(raw) - p.EXPORT_NAME_REPLY_SIZE)
    assert p.parse_export_name_reply(raw[:p.EXPORT_NAME_REPLY_SIZE]) == info


@given(requests)
def test_request_round_trips(req: p.Request) -> None:
    raw = p.encode_request(req)
    assert len(raw) == p.REQUEST_SIZE
    assert p.parse_request(raw) == req


@given(u32, u64)
def test_simple_reply_round_trips(error: int, cookie: int) -> None:
    raw = p.encode_simple_reply(error, cookie)
    assert p.parse_simple_reply(raw) == p.SimpleReply(error, cookie)


meta_queries = st.lists(names.filter(lambda q: len(q.encode()) <= p.MAX_STRING),
                        max_size=8).map(tuple)


@given(names, meta_queries)
def test_meta_context_request_round_trips(name: str, queries: tuple[str, ...]) -> None:
    raw = p.encode_meta_context_request(name, queries)
    assert p.parse_meta_context_request(raw) == p.MetaContextRequest(name, queries)


def test_too_many_meta_queries_are_too_big() -> None:
    raw = p.encode_meta_context_request("disk", ("x:y",) * (p.MAX_META_QUERIES + 1))
    with pytest.raises(p.TooBig, match="more than"):
        p.parse_meta_context_request(raw)


@pytest.mark.parametrize("queries, listing, expected", [
    ((), True, ["base:allocation"]),
    ((), False, []),
    (("base:",), True, ["base:allocation"]),
    (("base:",), False, []),                      # SET selects exact names only
    (("base:allocation",), False, ["base:allocation"]),
    (("base:allocation", "base:allocation"), False, ["base:allocation"]),
    (("qemu:dirty-bitmap:x", "nbd:"), True, []),
    (("base:allocationX",), False, []),
])
def test_match_meta_contexts(queries: tuple[str, ...], listing: bool, expected: list[str]) -> None:
    assert p.match_meta_contexts(queries, ("base:allocation",), listing) == expected


@given(u32, names.filter(lambda n: n != ""))
def test_rep_meta_context_round_trips(context: int, name: str) -> None:
    assert p.parse_rep_meta_context(p.encode_rep_meta_context(context, name)) == (context, name)


def _chunk(raw: bytes) -> tuple[p.ChunkHeader, Any]:
    head = p.parse_chunk_header(raw[:p.CHUNK_HEADER_SIZE])
    body = raw[p.CHUNK_HEADER_SIZE:]
    assert head.length == len(body)
    return head, p.parse_chunk_payload(head.type, body)


@given(u16, u64, u64, st.binary(min_size=1, max_size=300))
def test_offset_data_chunk_round_trips(flags: int, cookie: int, offset: int, data: bytes) -> None:
    raw = p.encode_offset_data_header(flags, cookie, offset, len(data)) + data
    head, chunk = _chunk(raw)
    assert head == p.ChunkHeader(flags, p.ReplyType.OFFSET_DATA, cookie, 8 + len(data))
    assert chunk == p.OffsetData(offset, data)


@given(u16, u64, u64, st.integers(1, 2**32 - 1))
def test_offset_hole_chunk_round_trips(flags: int, cookie: int, offset: int, size: int) -> None:
    assert _chunk(p.encode_offset_hole(flags, cookie, offset, size))[1] == p.OffsetHole(offset, size)


@given(u64, u32, st.lists(st.tuples(st.integers(1, 2**32 - 1), u32), min_size=1, max_size=50))
def test_block_status_chunk_round_trips(cookie: int, context: int,
                                        extents: list[tuple[int, int]]) -> None:
    head, chunk = _chunk(p.encode_block_status(p.REPLY_FLAG_DONE, cookie, context, extents))
    assert head.flags == p.REPLY_FLAG_DONE and chunk == p.BlockStatus(context, tuple(extents))


@given(u64, st.integers(1, 2**32 - 1), st.text(max_size=5000))
def test_error_chunk_round_trips_with_its_message_cut_to_a_string(
        cookie: int, error: int, message: str) -> None:
    head, chunk = _chunk(p.encode_error_chunk(p.REPLY_FLAG_DONE, cookie, error, message))
    assert head.type == p.ReplyType.ERROR and chunk.error == error
    clean = message.replace("\x00", " ")
    assert clean.startswith(chunk.message) and len(chunk.message.encode()) <= p.MAX_STRING
    if len(clean.encode()) <= p.MAX_STRING:
        assert chunk.message == clean


def test_none_chunk_is_done_and_empty() -> None:
    head, chunk = _chunk(p.encode_none_chunk(5))
    assert head == p.ChunkHeader(p.REPLY_FLAG_DONE, p.ReplyType.NONE, 5, 0) and chunk is None


def test_wire_layout_matches_proto_md() -> None:
    """Fixed byte images, so a symmetric encoder/parser bug cannot hide."""
    assert p.encode_request(p.Request(1, 1, 0x0102030405060708, 4096, 512)) == bytes.fromhex(
        "25609513" "0001" "0001" "0102030405060708" "0000000000001000" "00000200")
    assert p.encode_simple_reply(22, 7) == bytes.fromhex("67446698" "00000016" "0000000000000007")
    assert p.encode_option_reply(7, p.Reply.ERR_UNKNOWN) == bytes.fromhex(
        "0003e889045565a9" "00000007" "80000006" "00000000")
    assert p.encode_server_greeting() == b"NBDMAGICIHAVEOPT\x00\x03"
    assert p.encode_offset_hole(p.REPLY_FLAG_DONE, 7, 4096, 512) == bytes.fromhex(
        "668e33ef" "0001" "0002" "0000000000000007" "0000000c" "0000000000001000" "00000200")
    assert p.encode_block_status(0, 7, 1, [(512, 3)]) == bytes.fromhex(
        "668e33ef" "0000" "0005" "0000000000000007" "0000000c" "00000001" "00000200" "00000003")
    assert p.encode_error_chunk(p.REPLY_FLAG_DONE, 7, 95, "no") == bytes.fromhex(
        "668e33ef" "0001" "8001" "0000000000000007" "00000008" "0000005f" "0002") + b"no"
    assert p.encode_offset_data_header(0, 7, 8, 1) == bytes.fromhex(
        "668e33ef" "0000" "0001" "0000000000000007" "00000009" "0000000000000008")
    assert p.encode_meta_context_request("d", ("base:allocation",)) == bytes.fromhex(
        "00000001") + b"d" + bytes.fromhex("00000001" "0000000f") + b"base:allocation"
    assert p.encode_rep_meta_context(1, "base:allocation") == bytes.fromhex("00000001") + \
        b"base:allocation"


# --- validation ---------------------------------------------------------------------------
SIZE = 1 << 20


@pytest.mark.parametrize("req, expected", [
    (p.Request(0, p.Cmd.READ, 1, 0, 4096), p.Err.OK),
    (p.Request(p.CMD_FLAG_FUA, p.Cmd.WRITE, 1, SIZE - 512, 512), p.Err.OK),
    (p.Request(p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FUA, p.Cmd.WRITE_ZEROES, 1, 0, SIZE), p.Err.OK),
    (p.Request(0, p.Cmd.FLUSH, 1, 0, 0), p.Err.OK),
    (p.Request(0, p.Cmd.READ, 1, SIZE, 0), p.Err.OK),
    (p.Request(0, p.Cmd.READ, 1, SIZE - 1, 2), p.Err.EINVAL),
    (p.Request(0, p.Cmd.READ, 1, 0, p.MAX_PAYLOAD + 1), p.Err.EINVAL),
    (p.Request(0, p.Cmd.TRIM, 1, SIZE, 1), p.Err.EINVAL),
    (p.Request(0, p.Cmd.WRITE, 1, SIZE, 1), p.Err.ENOSPC),
    (p.Request(0, p.Cmd.WRITE_ZEROES, 1, 2**64 - 1, 1), p.Err.ENOSPC),
    (p.Request(p.CMD_FLAG_NO_HOLE, p.Cmd.WRITE, 1, 0, 1), p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_DF, p.Cmd.READ, 1, 0, 1), p.Err.EINVAL),
    (p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 1), p.Err.EINVAL),         # no meta context
    (p.Request(p.CMD_FLAG_FAST_ZERO, p.Cmd.WRITE_ZEROES, 1, 0, 1), p.Err.EINVAL),  # not offered
    (p.Request(0, p.Cmd.CACHE, 1, 0, SIZE), p.Err.OK),
    (p.Request(p.CMD_FLAG_FUA, p.Cmd.CACHE, 1, 0, 1), p.Err.OK),
    (p.Request(0, p.Cmd.CACHE, 1, SIZE, 1), p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_DF, p.Cmd.CACHE, 1, 0, 1), p.Err.EINVAL),
    (p.Request(0, 0xBEEF, 1, 0, 1), p.Err.EINVAL),
])
def test_check_request(req: p.Request, expected: p.Err) -> None:
    assert p.check_request(req, SIZE) == expected


NEGOTIATED = {"structured": True, "block_status": True, "fast_zero": True}


@pytest.mark.parametrize("req, negotiated, expected", [
    (p.Request(p.CMD_FLAG_DF, p.Cmd.READ, 1, 0, 4096), NEGOTIATED, p.Err.OK),
    (p.Request(p.CMD_FLAG_DF, p.Cmd.READ, 1, 0, 4096), {"block_status": True}, p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_DF, p.Cmd.WRITE, 1, 0, 1), NEGOTIATED, p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_REQ_ONE, p.Cmd.BLOCK_STATUS, 1, 0, SIZE), NEGOTIATED, p.Err.OK),
    (p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 2**32 - 1), NEGOTIATED, p.Err.EINVAL),  # past end
    (p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 0), NEGOTIATED, p.Err.EINVAL),
    (p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 1), {"structured": True}, p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_REQ_ONE, p.Cmd.READ, 1, 0, 1), NEGOTIATED, p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_FAST_ZERO | p.CMD_FLAG_NO_HOLE, p.Cmd.WRITE_ZEROES, 1, 0, SIZE),
     NEGOTIATED, p.Err.OK),
    (p.Request(p.CMD_FLAG_FAST_ZERO, p.Cmd.WRITE, 1, 0, 1), NEGOTIATED, p.Err.EINVAL),
    (p.Request(p.CMD_FLAG_FAST_ZERO, p.Cmd.WRITE_ZEROES, 1, SIZE, 1), NEGOTIATED, p.Err.ENOSPC),
])
def test_check_request_after_negotiation(req: p.Request, negotiated: dict[str, bool],
                                         expected: p.Err) -> None:
    assert p.check_request(req, SIZE, **negotiated) == expected


def test_every_refusal_says_why() -> None:
    err, why = p.request_error(p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 1), SIZE)
    assert err == p.Err.EINVAL and "NBD_OPT_SET_META_CONTEXT" in why
    err, why = p.request_error(p.Request(p.CMD_FLAG_DF, p.Cmd.READ, 1, 0, 1), SIZE)
    assert err == p.Err.EINVAL and "0x4" in why and "NBD_CMD_READ" in why
    err, why = p.request_error(p.Request(0, p.Cmd.READ, 1, SIZE, 1), SIZE)
    assert err == p.Err.EINVAL and "past the end" in why
    assert p.request_error(p.Request(0, 0x77, 1, 0, 1), SIZE) == (p.Err.EINVAL,
                                                                  "unknown command 119")
    assert p.request_error(p.Request(0, p.Cmd.READ, 1, 0, 1), SIZE) == (p.Err.OK, "")


@settings(max_examples=1000)
@given(requests, st.integers(0, 2**63), st.booleans(), st.booleans(), st.booleans())
def test_check_request_never_raises_and_bounds_hold(req: p.Request, size: int, structured: bool,
                                                    block_status: bool, fast_zero: bool) -> None:
    err, why = p.request_error(req, size, structured=structured, block_status=block_status,
                               fast_zero=fast_zero)
    assert bool(err) == bool(why)           # every refusal carries its reason
    if err == p.Err.OK and req.type not in (p.Cmd.DISC, p.Cmd.FLUSH):
        assert req.offset + req.length <= size
    if err == p.Err.OK:
        assert structured or not req.flags & p.CMD_FLAG_DF
        assert fast_zero or not req.flags & p.CMD_FLAG_FAST_ZERO
        assert block_status or req.type != p.Cmd.BLOCK_STATUS
        assert req.type != p.Cmd.BLOCK_STATUS or req.length > 0


@pytest.mark.parametrize("err, expected", [
    (errno.EPERM, p.Err.EPERM), (errno.EROFS, p.Err.EPERM), (errno.EIO, p.Err.EIO),
    (errno.ENOMEM, p.Err.ENOMEM), (errno.EINVAL, p.Err.EINVAL), (errno.ENOSPC, p.Err.ENOSPC),
    (errno.EOVERFLOW, p.Err.EOVERFLOW), (errno.EOPNOTSUPP, p.Err.ENOTSUP),
    (errno.ESHUTDOWN, p.Err.ESHUTDOWN), (errno.EBADF, p.Err.EIO), (None, p.Err.EIO),
])
def test_errno_to_nbd(err: int | None, expected: p.Err) -> None:
    assert p.errno_to_nbd(err) == expected


# --- hostile bytes ------------------------------------------------------------------------
PARSERS: dict[str, Callable[[bytes], Any]] = {
    "server_greeting": p.parse_server_greeting,
    "client_flags": p.parse_client_flags,
    "option_header": p.parse_option_header,
    "export_name": p.parse_export_name,
    "info_request": p.parse_info_request,
    "option_reply_header": p.parse_option_reply_header,
    "rep_server": p.parse_rep_server,
    "info_reply": p.parse_info_reply,
    "export_name_reply": p.parse_export_name_reply,
    "request": p.parse_request,
    "simple_reply": p.parse_simple_reply,
    "meta_context_request": p.parse_meta_context_request,
    "rep_meta_context": p.parse_rep_meta_context,
    "chunk_header": p.parse_chunk_header,
    "chunk_offset_data": lambda d: p.parse_chunk_payload(p.ReplyType.OFFSET_DATA, d),
    "chunk_offset_hole": lambda d: p.parse_chunk_payload(p.ReplyType.OFFSET_HOLE, d),
    "chunk_block_status": lambda d: p.parse_chunk_payload(p.ReplyType.BLOCK_STATUS, d),
    "chunk_error": lambda d: p.parse_chunk_payload(p.ReplyType.ERROR, d),
    "chunk_error_offset": lambda d: p.parse_chunk_payload(p.ReplyType.ERROR_OFFSET, d),
    "chunk_none": lambda d: p.parse_chunk_payload(p.ReplyType.NONE, d),
}

# One valid message per parser, to truncate and mutate.
VALID: dict[str, bytes] = {
    "server_greeting": p.encode_server_greeting(),
    "client_flags": p.encode_client_flags(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES),
    "option_header": p.encode_option_request(p.Option.GO, b"x" * 10)[:p.OPTION_HEADER_SIZE],
    "export_name": p.encode_export_name("disk-é"),
    "info_request": p.encode_info_request("disk", (p.Info.BLOCK_SIZE, p.Info.NAME)),
    "option_reply_header": p.encode_option_reply(3, p.Reply.ACK),
    "rep_server": p.encode_rep_server("disk", "a disk"),
    "info_reply": p.encode_info_export(p.ExportInfo(1 << 30, 0x6D)),
    "export_name_reply": p.encode_export_name_reply(p.ExportInfo(512, 1), True),
    "request": p.encode_request(p.Request(0, p.Cmd.WRITE, 9, 0, 512)),
    "simple_reply": p.encode_simple_reply(0, 9),
    "meta_context_request": p.encode_meta_context_request("disk", ("base:allocation", "x:")),
    "rep_meta_context": p.encode_rep_meta_context(1, "base:allocation"),
    "chunk_header": p.encode_chunk_header(1, p.ReplyType.OFFSET_DATA, 9, 20),
    "chunk_offset_data": p.encode_offset_data_header(0, 9, 512, 4)[p.CHUNK_HEADER_SIZE:] + b"data",
    "chunk_offset_hole": p.encode_offset_hole(0, 9, 512, 4096)[p.CHUNK_HEADER_SIZE:],
    "chunk_block_status": p.encode_block_status(0, 9, 1, [(4096, 3), (512, 0)])[
        p.CHUNK_HEADER_SIZE:],
    "chunk_error": p.encode_error_chunk(0, 9, 22, "bad")[p.CHUNK_HEADER_SIZE:],
    "chunk_error_offset": bytes.fromhex("00000005" "0002") + b"io" + (512).to_bytes(8, "big"),
    "chunk_none": b"",
}


def _parse_or_protocol_error(name: str, data: bytes) -> None:
    try:
        PARSERS[name](data)
    except p.ProtocolError:
        count("NBD message parsers", "rejected")  # the only acceptable failure
    else:
        count("NBD message parsers", "parsed")


@settings(max_examples=1500)
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=200))
def test_random_bytes_give_value_or_protocol_error(name: str, data: bytes) -> None:
    _parse_or_protocol_error(name, data)


@given(st.sampled_from(sorted(n for n in VALID if VALID[n])), st.data())
def test_truncated_messages_are_protocol_errors(name: str, data: st.DataObject) -> None:
    valid = VALID[name]
    cut = data.draw(st.integers(0, len(valid) - 1))
    if name in ("export_name", "rep_server", "rep_meta_context", "chunk_offset_data",
                "chunk_block_status"):
        _parse_or_protocol_error(name, valid[:cut])  # variable-length: a prefix may be valid
    else:
        with pytest.raises(p.ProtocolError):
            PARSERS[name](valid[:cut])
        count("NBD message parsers", "rejected")


@settings(max_examples=1500)
@given(st.sampled_from(sorted(VALID)), st.data())
def test_mutated_messages_give_value_or_protocol_error(name: str, data: st.DataObject) -> None:
    raw = bytearray(VALID[name] or b"\x00")
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    _parse_or_protocol_error(name, bytes(raw))


@given(st.binary(min_size=p.REQUEST_SIZE, max_size=p.REQUEST_SIZE))
def test_any_request_with_wrong_magic_is_refused(raw: bytes) -> None:
    if raw[:4] == bytes.fromhex("25609513"):
        assert isinstance(p.parse_request(raw), p.Request)
    else:
        with pytest.raises(p.ProtocolError, match="magic"):
            p.parse_request(raw)
        count("NBD request parser, wrong magic", "rejected")
