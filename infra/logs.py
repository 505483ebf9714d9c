"""Logging set-up: human lines by default, JSON lines (one object per record) for
journald/Loki/ELK with ``--log-format json``."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from journal.errors import BadInput

FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and exception text."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage(), "pid": record.process}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup(verbose: bool, fmt: str = "text") -> None:
    """Configure the root logger once per process; librdkafka chatter only with -v."""
    if fmt not in FORMATS:
        raise BadInput(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        logging.getLogger("x2x.librdkafka").setLevel(logging.CRITICAL)


@dataclass
class Repeats:
    """Says whether a warning is due: when it is new, and again only every ``every_s``
    while it stands, so a loop that meets it again and again (a watcher polling twice a
    second through an outage, an applier's slow fsyncs) leaves one line per ``every_s``
    rather than one each time. Each text keeps its own clock: an outage whose reason
    alternates (a refused connection, then a timeout, and back) says each reason once
    per ``every_s``, not every time it flips."""

    every_s: float = 30.0
    #: At most this many texts remembered; the oldest said is forgotten first.
    keep: int = 16
    _said: dict[str, float] = field(default_factory=dict, init=False)

    def due(self, text: str, now: float) -> bool:
        """Whether ``text`` should be logged at ``now`` (monotonic seconds)."""
        at = self._said.get(text)
        if at is not None and now - at < self.every_s:
            return False
        self._said.pop(text, None)          # re-inserted last: the newest said
        self._said[text] = now
        if len(self._said) > self.keep:
            del self._said[next(iter(self._said))]
        return True

    def over(self) -> bool:
        """The condition ended: whether a warning had been said about it (then say so)."""
        was = bool(self._said)
        self._said.clear()
        return was
