"""Scenario: many pairs. 200 pairs and 10,000 control events (20 and 500 with --quick):
how long ``x2x status``, ``x2x pair show``, a capturer start and an applier start take,
on a host that has never read the control topics (cold) and on one that has (warm: the
control cache), next to a bare confluent-kafka read of every control record, which is
what each call would cost if it re-read all history."""
from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from bench.common import Context, figure, x2x_cmd
from infra import control
from infra.net import free_port
from infra.reader import read_many
from infra.topics import CONTROL_TOPICS, control_topic, ensure_base_topics
from journal.events import BaselineComplete
from journal.pairs import PairSpec
from journal.roles import Role
from schemas.control import encode_event

TITLE = "Scale: 200 pairs, 10,000 control events: status, show, service starts"
_RUNS = 3


def _populate(ctx: Context, npairs: int, nevents: int, d: Path) -> list[str]:
    """Pairs through the operator's own path; the rest of the events as capturers'
    announcements, produced in bulk."""
    ensure_base_topics(ctx.settings.check_reachable())
    names = []
    for i in range(npairs):
        name = ctx.pair_name(f"scale{i}")
        vol = d / f"{i}.img"
        for path in (vol, d / f"{i}.dst"):
            with open(path, "wb") as f:
                f.truncate(1 << 20)
        control.create_pair(ctx.settings, PairSpec(name, str(vol), str(d / f"{i}.dst"),
                                                   65536, 1 << 20))
        names.append(name)
    producer = Producer(ctx.settings.side_producer(**{"linger.ms": 20}))
    for n in range(max(0, nevents - npairs)):
        name = names[n % npairs]
        ev = BaselineComplete(pair=name, epoch=1 + n // npairs)
        producer.produce(control_topic(Role.CAPTURER), encode_event(ev), key=name)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("control events were not all acknowledged")
    return names


def _timed(args: list[str], until: str | None, home: Path) -> float:
    """Seconds for ``x2x ARGS`` to finish (or, with ``until``, to print that line)."""
    env = {**os.environ, "X2X_HOME": str(home)}
    t0 = time.monotonic()
    if until is None:
        p = subprocess.run([*x2x_cmd(), *args], env=env, capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"x2x {' '.join(args)}: {p.stderr[-1500:]}")
        return time.monotonic() - t0
    proc = subprocess.Popen([*x2x_cmd(), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        took = time.monotonic() - t0
        if until not in line:
            raise RuntimeError(f"x2x {' '.join(args)}: {line}{proc.stderr.read()[-1500:]}")
        return took
    finally:
        proc.terminate()
        proc.wait(60)


def _bare_read(ctx: Context) -> tuple[int, float]:
    t0 = time.monotonic()
    n = sum(1 for _ in read_many(ctx.settings, {t: 0 for t in CONTROL_TOPICS}))
    return n, time.monotonic() - t0


def run(ctx: Context) -> dict[str, Any]:
    npairs, nevents = ctx.size(200, 20), ctx.size(10_000, 500)
    d = ctx.dir("scale")
    t0 = time.monotonic()
    names = _populate(ctx, npairs, nevents, d)
    populate_s = time.monotonic() - t0
    records, bare_s = min((_bare_read(ctx) for _ in range(_RUNS)), key=lambda r: r[1])
    one = names[len(names) // 2]
    # A pair is captured from one host only: every capturer (and applier) start gets a
    # pair of its own, never captured before, so each run is a real first start.
    fresh = iter(names[::-1])
    calls = {
        "x2x status": lambda: (["status", "--json"], None),
        "x2x pair show": lambda: (["pair", "show", one, "--json"], None),
        "capturer start (to serving)": lambda: (
            ["capture", next(fresh), "--nbd", f"127.0.0.1:{free_port()}"], "serving"),
        "applier start (empty journal, to exit)": lambda: (
            ["apply", next(fresh), "--until-caught-up"], None),
    }
    figures = []
    detail: dict[str, Any] = {"pairs": npairs, "control_records": records,
                              "populate_s": round(populate_s, 1),
                              "bare_read_s": round(bare_s, 3)}
    for label, make in calls.items():
        cold, warm = [], []
        for r in range(_RUNS):
            home = d / f"home-{label[:6].strip()}-{r}"
            cold.append(_timed(*make(), home=home))   # a host that never read the topics
            warm.append(_timed(*make(), home=home))   # the same host again: cached fold
        c, w = statistics.median(cold), statistics.median(warm)
        detail[label] = {"cold_s": round(c, 3), "warm_s": round(w, 3)}
        figures.append(figure(f"{label}, warm", "s", w, f"{label}, cold", c, "lower"))
    noop = statistics.median(_timed(["--help"], None, d / "home-help") for _ in range(_RUNS))
    figures.append(figure("bare read of every control record", "s", bare_s,
                          "x2x --help (interpreter + imports)", noop, "lower"))
    return {"title": TITLE, "figures": figures, "detail": detail}
