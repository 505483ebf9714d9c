"""Structured logs: one JSON object per line, and a bad format is refused by name."""
import json
import logging

import pytest

from infra import logs
from journal.errors import BadInput


def test_json_lines(capsys):
    logs.setup(verbose=True, fmt="json")
    try:
        logging.getLogger("x2x.test").info("applied %d ops", 5)
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("x2x.test").exception("failed")
        lines = capsys.readouterr().err.strip().splitlines()
        first, second = (json.loads(line) for line in lines)
        assert first["msg"] == "applied 5 ops" and first["level"] == "info"
        assert first["logger"] == "x2x.test" and first["ts"].endswith("Z")
        assert second["level"] == "error" and "ValueError: boom" in second["exc"]
    finally:
        logs.setup(verbose=False)


def test_unknown_format_is_refused():
    with pytest.raises(BadInput, match="unknown log format 'xml'"):
        logs.setup(verbose=False, fmt="xml")


def test_a_standing_warning_is_repeated_only_every_so_often():
    said = logs.Repeats(every_s=30.0)
    assert said.due("no pair named 'web'", 0.0)
    # Polled twice a second through an outage: silent until the interval passed ...
    assert not any(said.due("no pair named 'web'", t / 2) for t in range(1, 60))
    assert said.due("no pair named 'web'", 30.0)
    # ... unless what is wrong changed.
    assert said.due("broker unreachable", 30.5)
    assert said.over() and not said.over()
    assert said.due("broker unreachable", 31.0)   # a new outage is said at once


def test_alternating_reasons_are_each_said_once_per_interval():
    said = logs.Repeats(every_s=30.0)
    reasons = ("connection refused", "timed out")
    # An outage whose reason flips at every poll (twice a second) for a minute.
    told = [(t / 2, reasons[t % 2]) for t in range(120) if said.due(reasons[t % 2], t / 2)]
    assert told == [(0.0, "connection refused"), (0.5, "timed out"),
                    (30.0, "connection refused"), (30.5, "timed out")]


def test_repeats_remembers_a_bounded_number_of_texts():
    said = logs.Repeats(every_s=30.0, keep=2)
    assert said.due("a", 0.0) and said.due("b", 1.0) and said.due("c", 2.0)
    assert said.due("a", 3.0)           # forgotten when "c" came: said again
    assert not said.due("c", 4.0)       # still remembered
