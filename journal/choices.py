"""Parsing a command-line choice into one of a few enum values, with one error style."""
from __future__ import annotations

import enum
from typing import TypeVar

from journal.errors import BadInput

E = TypeVar("E", bound=enum.Enum)


def parse_choice(kind: type[E], text: str, option: str, hint: str) -> E:
    """``text`` (any case) as a member of ``kind``; else BadInput naming ``option`` and
    what each value means (``hint``)."""
    try:
        return kind(text.lower())
    except ValueError:
        raise BadInput(f"{option} {text!r} is invalid: use {hint}") from None
