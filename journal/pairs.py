"""Pairs: names, specs and the fold of control events into each pair's current state."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Iterable

from journal.errors import BadInput

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MIN_BLOCK, MAX_BLOCK = 4096, 4 << 20


def validate_name(name: str) -> str:
    """A pair name is also part of a Kafka topic name, so it follows the topic rules."""
    if not _NAME.match(name):
        raise BadInput(f"pair name {name!r} is invalid: use 1-200 letters, digits, '.', '_' "
                       f"or '-', starting with a letter or digit")
    return name


def parse_size(text: str) -> int:
    """``64KiB``, ``1M``, ``4096`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise BadInput(f"size {text!r} is invalid: use a number with an optional unit, "
                       f"e.g. 64KiB, 1MiB, 4096")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit if unit != "B" else ""]


def validate_block_size(size: int) -> int:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise BadInput(f"block size {size} is invalid: use a power of two from 4KiB to 4MiB")
    return size


@dataclass(frozen=True)
class PairSpec:
    name: str
    source: str
    target: str
    block_size: int
    volume_size: int
    key_id: str = ""        # set when the journal is encrypted and authenticated


@dataclass(frozen=True)
class PairState:
    """What folding the control topic says about one pair."""

    spec: PairSpec
    created_at_ms: int
    state: str = "created"          # created | needs-resync
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ControlEvent:
    event: str
    pair: str
    at_ms: int
    spec: PairSpec | None = None
    attrs: dict[str, str] = field(default_factory=dict)


def fold(events: Iterable[ControlEvent]) -> dict[str, PairState]:
    """Current pairs after applying ``events`` in order; unknown events are ignored so an
    older x2x can still read a newer control topic."""
    pairs: dict[str, PairState] = {}
    for ev in events:
        if ev.event == "created" and ev.spec is not None:
            pairs[ev.pair] = PairState(ev.spec, ev.at_ms)
        elif ev.event == "deleted":
            pairs.pop(ev.pair, None)
        elif ev.event == "resync-needed" and ev.pair in pairs:
            pairs[ev.pair] = replace(pairs[ev.pair], state="needs-resync",
                                     attrs={**pairs[ev.pair].attrs, **ev.attrs})
        elif ev.event == "resynced" and ev.pair in pairs:
            pairs[ev.pair] = replace(pairs[ev.pair], state="created")
    return pairs
