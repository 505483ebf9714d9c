"""The control codec (schemas/control.py): every kind of event round-trips through the
record x2x has always written; unknown kinds are skipped, malformed ones refused."""
from __future__ import annotations

import logging
import typing
from dataclasses import fields

import pytest
from hypothesis import given, settings, strategies as st

from infra.control import accepted
from journal.blocks import Extent
from journal.errors import CorruptEntry
from journal.events import KINDS, Created, Event, HashesCompared, Promoted, Sealed
from journal.spec import PairSpec
from schemas import codec
from schemas.control import decode_event, encode_event

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_long = st.integers(-(1 << 63), (1 << 63) - 1)
_BY_TYPE = {
    str: _text,
    int: _long,
    bool: st.booleans(),
    float: st.floats(allow_nan=False, allow_infinity=False),
    bytes: st.binary(max_size=40),
    tuple[Extent, ...]: st.lists(st.builds(Extent, st.integers(0, 1 << 50),
                                           st.integers(0, 1 << 30)), max_size=8).map(tuple),
}


def _field(tp) -> st.SearchStrategy:
    args = typing.get_args(tp)
    if type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return st.none() | _BY_TYPE[inner]
    return _BY_TYPE[tp]


@st.composite
def events(draw, kind: type[Event]) -> Event:
    hints = typing.get_type_hints(kind)
    pair = draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True))
    values = {f.name: draw(_field(hints[f.name])) for f in fields(kind)
              if f.name not in ("pair", "at_ms", "spec")}
    if kind is Created:
        values["spec"] = PairSpec(pair, draw(_text), draw(_text), draw(_long), draw(_long),
                                  draw(_text))
    return kind(pair=pair, at_ms=draw(st.integers(0, 1 << 62)), **values)


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=list(KINDS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_every_kind_round_trips_through_its_control_record(kind: type[Event], data) -> None:
    ev = data.draw(events(kind))
    assert decode_event(encode_event(ev)) == ev


def _raw(event: str, attrs: dict[str, str], spec: dict | None = None) -> bytes:
    return codec.encode(codec.CONTROL, {"event": event, "pair": "p", "at_ms": 5,
                                        "spec": spec, "attrs": attrs})


_PROMOTED = {"volume": "/t.img", "epoch": "3", "seq": "99", "forced": "0", "rpo_s": "0",
             "rpo_ops": "0", "promoted_at_ms": "1700000000000"}


def test_records_as_the_string_protocol_wrote_them_still_decode() -> None:
    # What the applier published before the events were typed, byte for byte the same
    # record: "0" for a float, and an attr this x2x does not know is ignored.
    ev = decode_event(_raw("promoted", {**_PROMOTED, "from_a_newer_x2x": "x"}))
    assert ev == Promoted(pair="p", at_ms=5, volume="/t.img", epoch=3, seq=99, forced=False,
                          rpo_s=0.0, rpo_ops=0, promoted_at_ms=1700000000000)
    sealed = decode_event(_raw("sealed", {"source": "/s", "epoch": "2", "seq": "7",
                                          "digest": "ab01", "refused_at_ms": "9"}))
    assert sealed == Sealed(pair="p", at_ms=5, source="/s", request=None, epoch=2, seq=7,
                            digest=b"\xab\x01", refused_at_ms=9)
    cmp = decode_event(_raw("hashes-compared", {
        "target": "/t", "epoch": "1", "seq": "4", "blocks": "16", "differing": "2",
        "extents": "0+65536,131072+65536", "truncated": "0"}))
    assert isinstance(cmp, HashesCompared)
    assert cmp.extents == (Extent(0, 65536), Extent(131072, 65536))
    spec = {"source": "/s", "target": "/t", "block_size": 65536, "volume_size": 1 << 20,
            "key_id": ""}
    assert decode_event(_raw("created", {}, spec)) == Created(
        pair="p", at_ms=5, spec=PairSpec("p", "/s", "/t", 65536, 1 << 20))


def test_a_kind_of_a_newer_x2x_is_skipped_not_refused() -> None:
    assert decode_event(_raw("some-future-event", {"epoch": "abc"})) is None


@pytest.mark.parametrize("attr,value", [("epoch", "abc"), ("epoch", " 3"), ("epoch", "1e3"),
                                        ("forced", "yes"), ("rpo_s", "nan"),
                                        ("promoted_at_ms", "")])
def test_a_known_kind_with_a_malformed_attr_is_refused_by_name(attr, value) -> None:
    with pytest.raises(CorruptEntry, match=f"'promoted' of pair 'p' has a malformed attr "
                                           f"{attr}="):
        decode_event(_raw("promoted", {**_PROMOTED, attr: value}))


def test_a_known_kind_without_a_required_attr_or_spec_is_refused() -> None:
    attrs = {k: v for k, v in _PROMOTED.items() if k != "seq"}
    with pytest.raises(CorruptEntry, match="lacks its attr 'seq'"):
        decode_event(_raw("promoted", attrs))
    with pytest.raises(CorruptEntry, match="'created' of pair 'p' has no spec"):
        decode_event(_raw("created", {}))
    with pytest.raises(CorruptEntry, match="malformed attr extents"):
        decode_event(_raw("resend-requested", {"source": "/s", "extents": "0+x"}))
    with pytest.raises(CorruptEntry, match="malformed attr digest"):
        decode_event(_raw("sealed", {"source": "/s", "epoch": "2", "seq": "7",
                                     "digest": "zz", "refused_at_ms": "9"}))


def test_a_created_event_must_carry_its_own_pairs_spec() -> None:
    with pytest.raises(ValueError, match="holds the spec of 'q'"):
        encode_event(Created(pair="p", spec=PairSpec("q", "/s", "/t", 65536, 1)))


class _Msg:
    """The three things accepted() reads of a Kafka message."""

    def __init__(self, value: bytes, topic: str = "x2x.control", offset: int = 41) -> None:
        self._value, self._topic, self._offset = value, topic, offset

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def offset(self) -> int:
        return self._offset


def test_a_reader_skips_malformed_and_unknown_events_with_a_warning_naming_the_offset(
        caplog) -> None:
    caplog.set_level(logging.WARNING, "x2x.control")
    assert accepted(_Msg(_raw("promoted", {**_PROMOTED, "epoch": "abc"}))) is None
    assert "skipping x2x.control offset 41" in caplog.text and "epoch='abc'" in caplog.text
    assert accepted(_Msg(_raw("some-future-event", {}))) is None
    assert accepted(_Msg(b"not a record")) is None
    ev = accepted(_Msg(_raw("promoted", _PROMOTED)))
    assert isinstance(ev, Promoted) and ev.epoch == 3
