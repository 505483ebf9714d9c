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
    """Says whether a warning is due: when it is new or changed, and again only every
    ``every_s`` while it stands, so a loop that meets it again and again (a watcher
    polling twice a second through an outage, an applier's slow fsyncs) leaves one line
    per ``every_s`` rather than one each time."""

    every_s: float = 30.0
    said: str = field(default="", init=False)
    _at: float = field(default=float("-inf"), init=False)

    def due(self, text: str, now: float) -> bool:
        """Whether ``text`` should be logged at ``now`` (monotonic seconds)."""
        if text != self.said or now - self._at >= self.every_s:
            self.said, self._at = text, now
            return True
        return False

    def over(self) -> bool:
        """The condition ended: whether a warning had been said about it (then say so)."""
        was, self.said, self._at = bool(self.said), "", float("-inf")
        return was
