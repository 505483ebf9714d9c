"""Bandwidth limits of a pair's link, as users write them, and when each applies.

A rate is bytes per second of journal records handed to Kafka (before Kafka's own
compression, producers/rate.py): ``20Mbit`` (decimal bits, as ``tc`` and link speeds count them),
``2.5MB``/``2MiB`` (bytes), ``unlimited``, or ``0``/``pause`` (nothing is sent: the
backlog stays on the source). A schedule is a list of rules, the first that matches the
capturer's local time wins, and the pair's ``--max-rate`` applies when none does::

    Mon-Fri 08:00-18:00=10Mbit, Sat 00:00-06:00=pause, *=unlimited

Pure: parsing, validation and ``rate_at(datetime)``; the token bucket that obeys the
rate is producers/rate.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from journal.errors import BadInput

#: None: unlimited; 0: paused; else bytes per second.
Rate = int | None

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)(?:/s)?\s*$")
_BIT_PREFIX = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12}
_BYTE_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
_EXAMPLES = "e.g. 20Mbit, 500Kbit, 2MB, 4MiB, unlimited or pause"
#: Below this a journal record (up to 1 MiB) takes minutes: surely a typo (bit vs byte).
MIN_RATE = 8_000


def parse_rate(text: str, what: str = "rate") -> Rate:
    """``20Mbit`` -> 2_500_000 bytes/s; ``unlimited`` -> None; ``0``/``pause`` -> 0."""
    word = text.strip().lower()
    if word in ("unlimited", "none", "off"):
        return None
    if word in ("0", "pause", "paused"):
        return 0
    m = _RATE.match(text)
    if not m:
        raise BadInput(f"{what} {text!r} is not a rate: use a number and a unit, {_EXAMPLES}")
    number, unit = float(m.group(1)), m.group(2)
    bits = next((unit.lower()[:-len(w)] for w in ("bits", "bit")
                 if unit.lower().endswith(w)), None)
    if bits is not None and bits in _BIT_PREFIX:
        bps = number * _BIT_PREFIX[bits] / 8
    elif unit.upper() in _BYTE_UNITS and unit.endswith("B") and unit[:1] != "b":
        bps = number * _BYTE_UNITS[unit.upper()]
    elif unit == "":
        raise BadInput(f"{what} {text!r} has no unit: say bits or bytes per second, "
                       f"{_EXAMPLES}")
    elif unit.lower() in ("b", "kb", "mb", "gb", "tb"):
        p = unit[:-1].upper()
        raise BadInput(f"{what} {text!r} is ambiguous ({unit!r}): write {m.group(1)}{p}bit "
                       f"for bits or {m.group(1)}{p}B for bytes per second")
    else:
        raise BadInput(f"{what} {text!r} has an unknown unit {unit!r}: {_EXAMPLES}")
    if bps == 0:
        return 0
    if bps < MIN_RATE:
        raise BadInput(f"{what} {text!r} is below {format_rate(MIN_RATE)}: a journal record "
                       f"would take minutes; use pause to stop sending")
    return int(bps)


def format_rate(rate: Rate) -> str:
    """2_500_000 -> ``20 Mbit/s``; None -> ``unlimited``; 0 -> ``paused``."""
    if rate is None:
        return "unlimited"
    if rate == 0:
        return "paused"
    bits = rate * 8
    for unit, scale in (("Gbit", 10 ** 9), ("Mbit", 10 ** 6), ("Kbit", 10 ** 3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}/s"
    return f"{bits:.0f} bit/s"


@dataclass(frozen=True)
class Rule:
    """``days`` (Monday = 0) and ``start``..``end`` minutes of the day (end may be below
    start: across midnight, on the day it starts) get ``rate``."""

    days: frozenset[int]
    start: int
    end: int
    rate: Rate
    text: str

    def matches(self, at: datetime) -> bool:
        minute = at.hour * 60 + at.minute
        day = at.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        if self.start == self.end:          # the whole day
            return day in self.days
        # Across midnight: the evening of a listed day, or the morning after it.
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


@dataclass(frozen=True)
class Schedule:
    rules: tuple[Rule, ...]
    text: str

    def rate_at(self, at: datetime, default: Rate = None) -> Rate:
        """The rate of the first rule matching ``at``; ``default`` when none does."""
        for rule in self.rules:
            if rule.matches(at):
                return rule.rate
        return default


_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


def _minute(text: str, rule: str) -> int:
    m = _TIME.match(text)
    if not m or int(m.group(1)) > 24 or int(m.group(2)) > 59 or (
            int(m.group(1)) == 24 and int(m.group(2))):
        raise BadInput(f"--rate-schedule rule {rule!r}: {text!r} is not a time of day "
                       f"(HH:MM, 00:00..24:00)")
    return int(m.group(1)) * 60 + int(m.group(2))


def _days(text: str, rule: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().split("+"):
        lo, _, hi = part.partition("-")
        if lo not in DAYS or (hi and hi not in DAYS):
            raise BadInput(f"--rate-schedule rule {rule!r}: {text!r} is not a day or a "
                           f"range of days (Mon..Sun, e.g. Mon-Fri or Sat+Sun)")
        a, b = DAYS.index(lo), DAYS.index(hi or lo)
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


def parse_schedule(text: str) -> Schedule:
    """``"Mon-Fri 08:00-18:00=10Mbit, *=unlimited"`` -> a Schedule. A rule is
    ``[DAYS] [HH:MM-HH:MM]=RATE`` or ``*=RATE``; DAYS is ``Mon``, ``Mon-Fri`` or
    ``Sat+Sun``; a rule without days is every day, one without times the whole day."""
    rules: list[Rule] = []
    if not text.strip():
        raise BadInput("--rate-schedule is empty: give rules like "
                       "'Mon-Fri 08:00-18:00=10Mbit,*=unlimited'")
    for raw in text.split(","):
        rule = raw.strip()
        when, sep, rate_text = rule.rpartition("=")
        if not sep or not rate_text.strip():
            raise BadInput(f"--rate-schedule rule {rule!r} has no '=RATE': write "
                           f"e.g. 'Mon-Fri 08:00-18:00=10Mbit'")
        rate = parse_rate(rate_text, f"--rate-schedule rule {rule!r}: rate")
        words = when.split()
        days, start, end = frozenset(range(7)), 0, 0
        if words == ["*"]:
            words = []
        elif not words:
            raise BadInput(f"--rate-schedule rule {rule!r} says nothing about when: "
                           f"write '*={rate_text.strip()}' for always")
        if words and _TIME.match(words[-1].partition("-")[0]):
            lo, dash, hi = words.pop().partition("-")
            if not dash:
                raise BadInput(f"--rate-schedule rule {rule!r}: a time range is "
                               f"HH:MM-HH:MM")
            start, end = _minute(lo, rule), _minute(hi, rule)
            if start == end:
                raise BadInput(f"--rate-schedule rule {rule!r}: {lo}-{hi} is empty")
            end %= 24 * 60
        if len(words) > 1:
            raise BadInput(f"--rate-schedule rule {rule!r}: expected [DAYS] [HH:MM-HH:MM], "
                           f"got {when.strip()!r}")
        if words:
            days = _days(words[0], rule)
        rules.append(Rule(days, start, end, rate, rule))
    return Schedule(tuple(rules), text.strip())


def rate_at(max_rate: Rate, schedule: Schedule | None, at: datetime) -> Rate:
    """What applies at ``at``: the schedule's first matching rule, else ``max_rate``."""
    return schedule.rate_at(at, max_rate) if schedule else max_rate


@dataclass(frozen=True)
class LinkLimit:
    """A pair's bandwidth setting (``x2x pair rate``), as the fold keeps it."""

    max_rate: Rate = None
    schedule: Schedule | None = None

    @classmethod
    def parse(cls, max_rate: str | None, schedule: str | None) -> "LinkLimit":
        return cls(parse_rate(max_rate, "--max-rate") if max_rate else None,
                   parse_schedule(schedule) if schedule else None)

    @property
    def limited(self) -> bool:
        return self.max_rate is not None or self.schedule is not None

    def rate_at(self, at: datetime) -> Rate:
        return rate_at(self.max_rate, self.schedule, at)

    def describe(self) -> str:
        text = format_rate(self.max_rate)
        return f"{text}; schedule {self.schedule.text}" if self.schedule else text
