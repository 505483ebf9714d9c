"""Control events on the wire: the one place a typed event (journal/events.py) becomes a
ControlEvent record (schemas/control.avsc) and back.

The record is what x2x has always written, so control topics of an older x2x stay
readable: the kind's name, the pair, the stamp, the spec (``created`` only) and
``attrs``, a map of strings. Each field of a kind is the attr of the same name: ints in
decimal, flags ``1``/``0``, floats as Python writes them, bytes in hex, extents as
``offset+length,...``; a field that is None is left out.

Decoding returns None for a kind this x2x does not know (a newer x2x's; readers skip it),
ignores attrs it does not know (a newer x2x may add some), and refuses a known kind with
a missing or malformed attr with :class:`CorruptEntry`, naming the attr: nothing is
parsed from strings after this module.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, fields
from typing import Any, Callable

from journal.blocks import Extent, format_extents, parse_extents
from journal.errors import CorruptEntry
from journal.events import KINDS, Created, Event
from journal.spec import PairSpec
from schemas import codec

_INT = re.compile(r"-?[0-9]+")


def _int(text: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError("not an integer")
    return int(text)


def _bool(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("not 0 or 1")
    return text == "1"


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


#: How each field type is written into an attr and read back (ValueError if malformed).
_TEXT: dict[Any, tuple[Callable[[Any], str], Callable[[str], Any]]] = {
    str: (str, str),
    int: (str, _int),
    bool: (lambda b: "1" if b else "0", _bool),
    float: (repr, _float),
    bytes: (bytes.hex, bytes.fromhex),
    tuple[Extent, ...]: (format_extents, lambda t: tuple(parse_extents(t))),
}


def _attr_fields(kind: type[Event]) -> list[tuple[str, Any, bool]]:
    """(name, type, may be None) of each field of ``kind`` written as an attr."""
    hints = typing.get_type_hints(kind)
    out = []
    for f in fields(kind):
        if f.name in ("pair", "at_ms", "spec"):
            continue
        tp, optional = hints[f.name], False
        args = typing.get_args(tp)
        if type(None) in args:
            (tp,), optional = [a for a in args if a is not type(None)], True
        if tp not in _TEXT:
            raise TypeError(f"{kind.__name__}.{f.name}: no attr format for {tp}")
        out.append((f.name, tp, optional))
    return out


_ATTRS = {kind: _attr_fields(kind) for kind in KINDS.values()}


def encode_event(ev: Event) -> bytes:
    """The control record of ``ev``, single-object encoded."""
    attrs = {}
    for name, tp, _ in _ATTRS[type(ev)]:
        value = getattr(ev, name)
        if value is not None:
            attrs[name] = _TEXT[tp][0](value)
    spec = None
    if isinstance(ev, Created):
        if ev.spec.name != ev.pair:
            raise ValueError(f"created event of pair {ev.pair!r} holds the spec of "
                             f"{ev.spec.name!r}")
        # The incarnation is the event's own stamp, set by the fold: never written.
        spec = {k: v for k, v in asdict(ev.spec).items() if k not in ("name", "incarnation")}
    return codec.encode(codec.CONTROL, {"event": ev.NAME, "pair": ev.pair, "at_ms": ev.at_ms,
                                        "spec": spec, "attrs": attrs})


def decode_event(data: bytes) -> Event | None:
    """The event in a control record; None if its kind is unknown to this x2x. Raises
    CorruptEntry if the record does not decode or a known kind's attrs are malformed."""
    r = codec.decode(data, codec.CONTROL)
    kind = KINDS.get(r["event"])
    if kind is None:
        return None
    what = f"control event {r['event']!r} of pair {r['pair']!r}"
    values: dict[str, Any] = {}
    for name, tp, optional in _ATTRS[kind]:
        text = r["attrs"].get(name)
        if text is None:
            if optional:
                continue
            raise CorruptEntry(f"{what} lacks its attr {name!r}; refused")
        try:
            values[name] = _TEXT[tp][1](text)
        except ValueError as e:
            raise CorruptEntry(f"{what} has a malformed attr {name}={text[:40]!r} "
                               f"({e}); refused") from None
    if kind is Created:
        if r["spec"] is None:
            raise CorruptEntry(f"{what} has no spec; refused")
        values["spec"] = PairSpec(name=r["pair"], **r["spec"])
    return kind(pair=r["pair"], at_ms=r["at_ms"], **values)
