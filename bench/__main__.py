"""``python -m bench [--quick] [--out DIR] [--only NAME ...]``: every scenario, side by side
with its peers, on an embedded broker of its own; writes DIR/latest.json and latest.md."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

#: Scenario key -> module, in the issue's order (the JSON and the table keep it).
SCENARIOS = {
    "pipeline": "bench.pipeline",
    "nbd_capture": "bench.nbd",
    "lag": "bench.lag",
    "resync": "bench.resync",
    "sparse_baseline": "bench.sparse_baseline",
    "replay": "bench.replay",
    "memory": "bench.memory",
}
#: Run order differs: replay reuses the pipeline's journal, and memory lists the peaks of
#: every x2x child the other scenarios ran.
RUN_ORDER = ["pipeline", "replay", "nbd_capture", "lag", "resync", "sparse_baseline",
             "memory"]
DEFAULT_OUT = Path(__file__).parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="Tiny sizes: every scenario in under a minute (what the test runs).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="Directory for latest.json and latest.md (default bench/results).")
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                    help=f"Run only these scenarios: {', '.join(SCENARIOS)}.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="x2x-bench-"))
    # Everything x2x reads from the environment points at this run only: its own state
    # directory and its own broker, inherited by every x2x child process.
    os.environ["X2X_HOME"] = str(work / "home")
    for var in ("X2X_KAFKA_CONFIG", "X2X_COMPRESSION"):
        os.environ.pop(var, None)
    from infra import broker
    from infra.kafka import KafkaSettings
    from bench.common import Context

    started = time.time()
    state = broker.up(port=_free_port())
    os.environ["X2X_BOOTSTRAP"] = state.bootstrap
    ctx = Context(args.quick, KafkaSettings.resolve(state.bootstrap), work / "data")
    results: dict[str, Any] = {}
    try:
        for key in [k for k in RUN_ORDER if not args.only or k in args.only]:
            mod = importlib.import_module(SCENARIOS[key])
            print(f"[bench] {key}: {mod.TITLE}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                results[key] = mod.run(ctx)
            except Exception as e:  # one broken scenario must not lose the others' figures
                traceback.print_exc()
                results[key] = {"title": mod.TITLE, "error": f"{type(e).__name__}: {e}"}
            results[key]["wall_seconds"] = round(time.monotonic() - t0, 2)
            print(f"[bench] {key}: done in {results[key]['wall_seconds']} s",
                  file=sys.stderr, flush=True)
    finally:
        broker.down()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    doc = {
        "meta": {"quick": args.quick, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "wall_seconds": round(time.time() - started, 1),
                 "machine": platform.platform(), "cpus": os.cpu_count(),
                 "python": platform.python_version(),
                 "broker": "embedded Tansu (memory storage), one partition per topic",
                 "ratio": "x2x / peer; 'better' says which direction wins"},
        "scenarios": {k: results[k] for k in SCENARIOS if k in results},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    (args.out / "latest.md").write_text(table)
    print(table)
    print(f"written to {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return 1 if any("error" in r for r in results.values()) else 0


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:,.0f}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown(doc: dict[str, Any]) -> str:
    """The table people read: one row per figure, skipped and failed scenarios named."""
    m = doc["meta"]
    lines = [f"# x2x benchmarks{' (quick)' if m['quick'] else ''}", "",
             f"{m['at']}, {m['machine']}, {m['cpus']} CPUs, {m['broker']}; "
             f"ratio = x2x / peer.", "",
             "| scenario | metric | unit | x2x | peer | peer value | ratio | better |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | --- |"]
    for key, r in doc["scenarios"].items():
        if "skipped" in r or "error" in r:
            what = f"skipped: {r['skipped']}" if "skipped" in r else f"ERROR: {r['error']}"
            lines.append(f"| {key} | {what} | | | | | | |")
            continue
        for f in r["figures"]:
            lines.append(f"| {key} | {f['metric']} | {f['unit']} | {_fmt(f['x2x'])} | "
                         f"{f['peer_name']} | {_fmt(f['peer'])} | {_fmt(f['ratio'])} | "
                         f"{f['better']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
