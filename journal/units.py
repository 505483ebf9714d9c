"""Sizes as users write them (``64KiB``, ``50GiB``, ``4096``), in binary units."""
from __future__ import annotations

import re

from journal.errors import BadInput

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``64KiB``, ``1M``, ``4096`` -> bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise BadInput(f"size {text!r} is invalid: use a number with an optional unit, "
                       f"e.g. 64KiB, 1MiB, 4096")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) * _UNITS[unit if unit != "B" else ""]
