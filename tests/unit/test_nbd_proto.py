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


def test_wire_layout_matches_proto_md() -> None:
    """Fixed byte images, so a symmetric encoder/parser bug cannot hide."""
    assert p.encode_request(p.Request(1, 1, 0x0102030405060708, 4096, 512)) == bytes.fromhex(
        "25609513" "0001" "0001" "0102030405060708" "0000000000001000" "00000200")
    assert p.encode_simple_reply(22, 7) == bytes.fromhex("67446698" "00000016" "0000000000000007")
    assert p.encode_option_reply(7, p.Reply.ERR_UNKNOWN) == bytes.fromhex(
        "0003e889045565a9" "00000007" "80000006" "00000000")
    assert p.encode_server_greeting() == b"NBDMAGICIHAVEOPT\x00\x03"


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
    (p.Request(0, p.Cmd.BLOCK_STATUS, 1, 0, 1), p.Err.EINVAL),
    (p.Request(0, p.Cmd.CACHE, 1, 0, 1), p.Err.EINVAL),
    (p.Request(0, 0xBEEF, 1, 0, 1), p.Err.EINVAL),
])
def test_check_request(req: p.Request, expected: p.Err) -> None:
    assert p.check_request(req, SIZE) == expected


@given(requests, st.integers(0, 2**63))
def test_check_request_never_raises_and_bounds_hold(req: p.Request, size: int) -> None:
    err = p.check_request(req, size)
    if err == p.Err.OK and req.type in (p.Cmd.READ, p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES):
        assert req.offset + req.length <= size


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


@given(st.sampled_from(sorted(VALID)), st.data())
def test_truncated_messages_are_protocol_errors(name: str, data: st.DataObject) -> None:
    valid = VALID[name]
    cut = data.draw(st.integers(0, len(valid) - 1))
    if name in ("export_name", "rep_server"):
        _parse_or_protocol_error(name, valid[:cut])  # variable-length: a prefix may be valid
    else:
        with pytest.raises(p.ProtocolError):
            PARSERS[name](valid[:cut])
        count("NBD message parsers", "rejected")


@settings(max_examples=1500)
@given(st.sampled_from(sorted(VALID)), st.data())
def test_mutated_messages_give_value_or_protocol_error(name: str, data: st.DataObject) -> None:
    raw = bytearray(VALID[name])
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
