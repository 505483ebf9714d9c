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
