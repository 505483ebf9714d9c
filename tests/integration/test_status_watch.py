"""``x2x status --watch`` refreshes: redrawn in place on a terminal, appended plainly
(once per interval) through a pipe, one JSON document per interval with --json."""
from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import make_image, run_x2x, x2x_bin

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(broker, tmp_path: Path, pair_name: str) -> str:
    src = make_image(tmp_path / "src.img", 1 << 20)
    run_x2x("pair", "create", pair_name, "--source", str(src), "--target",
            str(tmp_path / "dst.img"), "--create-target")
    return pair_name


def _ctrl_c_as_on_a_terminal() -> None:
    """In the child before exec: SIGINT handled by default, as a shell's foreground job
    has it. A test run started as a background job of a script inherits SIGINT ignored
    (bash does that to '&' jobs without job control), and x2x, like any program, would
    then ignore the Ctrl-C these tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _read_until(fd: int, done, seconds: float) -> bytes:
    """What the terminal showed, read until ``done(out)`` or ``seconds`` or its close."""
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done(out):
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:               # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def _run_for(args: list[str], frames: int, marker: bytes) -> str:
    """Run ``x2x args`` until ``marker`` appeared ``frames`` times, then Ctrl-C it."""
    proc = subprocess.Popen([x2x_bin(), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_ctrl_c_as_on_a_terminal)
    fd = proc.stdout.fileno()
    out = _read_until(fd, lambda o: o.count(marker) >= frames, 30)
    proc.send_signal(signal.SIGINT)          # Ctrl-C: a clean end, exit code 0
    out += _read_until(fd, lambda o: False, 15)
    code = proc.wait(15)
    proc.stdout.close()
    text = out.decode(errors="replace")
    assert code == 0, text
    return text


def test_watch_through_a_pipe_prints_plain_frames(pair: str) -> None:
    out = _run_for(["status", pair, "--watch", "--interval", "0.2"], 3, b"\n-- ")
    assert len(re.findall(r"^-- \d{4}-\d\d-\d\d ", out, re.M)) >= 2, out
    assert out.count(pair) >= 2
    assert "\x1b[" not in out                # no cursor movement or colour in a log


def test_watch_json_is_a_stream_of_documents(pair: str) -> None:
    out = _run_for(["status", pair, "--watch", "--json", "--interval", "0.2"], 3, b'"pair"')
    docs, decoder, text = [], json.JSONDecoder(), out.strip()
    while text:
        doc, end = decoder.raw_decode(text)
        docs.append(doc)
        text = text[end:].strip()
    assert len(docs) >= 2
    assert docs[0][0]["pair"] == pair


def test_watch_on_a_terminal_redraws_in_place(pair: str) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen([x2x_bin(), "status", pair, "--watch", "--interval", "0.2"],
                            stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
                            preexec_fn=_ctrl_c_as_on_a_terminal)
    os.close(follower)
    # Ctrl-C only once two frames are up: one sent while a loaded machine is still
    # starting the program ends it as click's "Aborted!" (exit 1), which is not what
    # this test is about.
    out = _read_until(leader, lambda o: o.count(b"x2x status at") >= 2, 30)
    proc.send_signal(signal.SIGINT)
    out += _read_until(leader, lambda o: False, 15)
    code = proc.wait(15)
    os.close(leader)
    text = out.decode(errors="replace")
    assert code == 0, text
    assert "Ctrl-C to stop" in text and pair in text
    assert text.count("x2x status at") >= 2
    assert "\x1b[1A" in text or "\x1b[2K" in text     # Live moves the cursor back up


def test_watch_rejects_a_non_positive_interval(broker) -> None:
    proc = run_x2x("status", "--watch", "--interval", "0", check=False)
    assert proc.returncode == 2 and "--interval must be a positive" in proc.stderr
