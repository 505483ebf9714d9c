"""``python -m bench [--quick] [--out DIR] [--only NAME ... [--merge]] [--engines E,...]``: every
scenario, side by side with its peers, on brokers of its own; writes DIR/latest.json and
latest.md.

The first engine (Apache Kafka, one node) runs every scenario; the others (a three-node
Kafka cluster with acks=all and min.insync.replicas=2, Tansu in memory) run the ones
where the broker is what is measured: pipeline, replay and lag (RPO), each against a
bare confluent-kafka loop on the same broker; the scale scenario runs on the cluster.
Their rows are keyed ``NAME@ENGINE``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
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
    "nbd_multiconn": "bench.nbd_multiconn",
    "lag": "bench.lag",
    "resync": "bench.resync",
    "sparse_baseline": "bench.sparse_baseline",
    "replay": "bench.replay",
    "memory": "bench.memory",
    "scale": "bench.scale",
    "history": "bench.history",
    "pgbench": "bench.pgbench",
    "auto_failover": "bench.auto_failover",
    "cutover": "bench.cutover",
    "trace_capture": "bench.trace",
    "compression": "bench.compression",
    "groups": "bench.groups",
}
#: Run order differs: replay reuses the pipeline's journal, and memory lists the peaks of
#: every x2x child the other scenarios ran.
RUN_ORDER = ["pipeline", "replay", "nbd_capture", "nbd_multiconn", "lag", "resync",
             "sparse_baseline", "history", "pgbench", "trace_capture", "auto_failover",
             "cutover", "compression", "groups", "scale", "memory"]
#: Scenarios that every engine runs (the broker is what they measure).
PER_ENGINE = ["pipeline", "replay", "lag"]
#: Engine name -> how ``x2x broker up`` starts it, and how the table names it.
ENGINES = {"kafka": ({"engine": "kafka", "nodes": 1}, "Apache Kafka 1 node"),
           "kafka-3": ({"engine": "kafka", "nodes": 3},
                       "Apache Kafka 3 nodes, RF 3, min.insync.replicas 2, acks=all"),
           "tansu": ({"engine": "tansu"}, "Tansu, memory storage")}
DEFAULT_OUT = Path(__file__).parent / "results"


def plan(engines: list[str], only: list[str] | None) -> list[tuple[str, str]]:
    """(engine, scenario) in run order: everything on the first engine (scale on the
    cluster when there is one), the broker-bound scenarios on the others."""
    steps = []
    scale_on = "kafka-3" if "kafka-3" in engines else engines[0]
    for i, engine in enumerate(engines):
        keys = [k for k in RUN_ORDER if k != "scale"] if i == 0 else list(PER_ENGINE)
        if engine == scale_on:
            keys.insert(keys.index("memory") if "memory" in keys else len(keys), "scale")
        steps += [(engine, k) for k in keys if not only or k in only]
    return steps


def result_key(engines: list[str], engine: str, key: str) -> str:
    return key if engine == engines[0] else f"{key}@{engine}"


def _order(engines: list[str]):
    """Table order: engine by engine, each in the scenarios' own order."""
    def key(rkey: str) -> tuple[int, int]:
        name, _, engine = rkey.partition("@")
        return engines.index(engine or engines[0]), list(SCENARIOS).index(name)
    return key


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="Tiny sizes: every scenario in under a minute (what the test runs).")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="Directory for latest.json and latest.md (default bench/results).")
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                    help=f"Run only these scenarios: {', '.join(SCENARIOS)}.")
    ap.add_argument("--keep", action="store_true", help="Keep the work directory.")
    ap.add_argument("--merge", action="store_true",
                    help="With --only: put these scenarios' results into the DIR/latest.json "
                         "there is (its other figures kept, the rerun named in it).")
    ap.add_argument("--engines", default=None,
                    help=f"Comma-separated, first runs everything: {', '.join(ENGINES)} "
                         f"(default all three; kafka alone with --quick).")
    args = ap.parse_args(argv)
    if args.merge and not (args.only and (args.out / "latest.json").exists()):
        ap.error(f"--merge needs --only and a {args.out / 'latest.json'} to merge into")
    engines = (args.engines or ("kafka" if args.quick else ",".join(ENGINES))).split(",")
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        ap.error(f"unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    base = json.loads((args.out / "latest.json").read_text()) if args.merge else None
    if base is not None:
        # Rows of the first engine carry no @ENGINE: the same engine must come first.
        first = base["meta"]["broker"].split(":", 1)[0]
        if engines[0] != first:
            ap.error(f"--merge: {args.out / 'latest.json'} ran {first} first; run with "
                     f"--engines {first},... so its rows match")

    work = Path(tempfile.mkdtemp(prefix="x2x-bench-"))
    for var in ("X2X_KAFKA_CONFIG", "X2X_COMPRESSION"):
        os.environ.pop(var, None)
    from infra import broker
    from infra.kafka import KafkaSettings
    from infra.net import free_port
    from bench.common import WARM_S, Context, warm_broker

    started = time.time()
    results: dict[str, Any] = {}
    warmed: dict[str, dict[str, Any]] = {}
    steps = plan(engines, args.only)
    try:
        for engine in dict.fromkeys(e for e, _ in steps):
            # Everything x2x reads from the environment points at this engine's run only:
            # its own state directory and broker, inherited by every x2x child process.
            os.environ["X2X_HOME"] = str(work / f"home-{engine}")
            print(f"[bench] starting {ENGINES[engine][1]}", file=sys.stderr, flush=True)
            state = broker.up(port=free_port(), **ENGINES[engine][0])
            os.environ["X2X_BOOTSTRAP"] = state.bootstrap
            ctx = Context(args.quick, KafkaSettings.resolve(state.bootstrap),
                          work / f"data-{engine}")
            if ENGINES[engine][0]["engine"] == "kafka" and not args.quick:
                # A JVM compiles its hot paths as they run: measured cold, every early
                # figure would pay for that, and a production broker is long warm.
                rates = warm_broker(ctx.settings, ENGINES[engine][1])
                warmed[engine] = {"seconds": WARM_S, "rounds": len(rates),
                                  "first_records_per_s": round(rates[0]),
                                  "last_records_per_s": round(rates[-1])}
            try:
                for _, key in [s for s in steps if s[0] == engine]:
                    rkey = result_key(engines, engine, key)
                    results[rkey] = _run_one(key, ctx)
                    results[rkey]["broker"] = ENGINES[engine][1]
            finally:
                broker.down()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    doc = {
        "meta": {"quick": args.quick, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "wall_seconds": round(time.time() - started, 1),
                 "machine": platform.platform(), "cpus": os.cpu_count(),
                 "python": platform.python_version(),
                 "broker": "; ".join(f"{e}: {ENGINES[e][1]}" for e in engines)
                           + "; one partition per topic",
                 "ratio": "x2x / peer; 'better' says which direction wins",
                 "broker_warm_up": warmed},
        "scenarios": {k: results[k] for k in sorted(results, key=_order(engines))},
    }
    if base is not None:
        doc = merge(base, doc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(doc)
    (args.out / "latest.md").write_text(table)
    print(table)
    print(f"written to {args.out / 'latest.json'} and {args.out / 'latest.md'}")
    return 1 if any("error" in r for r in results.values()) else 0


def merge(base: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``rerun``'s scenarios in place of its own (in base's order, new ones
    last); its meta keeps base's run and lists the rerun (when, which, warm-up)."""
    m = rerun["meta"]
    scenarios = {**base["scenarios"], **rerun["scenarios"]}
    reruns = [*base["meta"].get("reruns", []),
              {"at": m["at"], "scenarios": list(rerun["scenarios"]),
               "wall_seconds": m["wall_seconds"], "broker_warm_up": m["broker_warm_up"]}]
    return {"meta": {**base["meta"], "reruns": reruns}, "scenarios": scenarios}


def _run_one(key: str, ctx: Any) -> dict[str, Any]:
    mod = importlib.import_module(SCENARIOS[key])
    print(f"[bench] {key}: {mod.TITLE}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        result = mod.run(ctx)
    except Exception as e:  # one broken scenario must not lose the others' figures
        traceback.print_exc()
        result = {"title": mod.TITLE, "error": f"{type(e).__name__}: {e}"}
    result["wall_seconds"] = round(time.monotonic() - t0, 2)
    print(f"[bench] {key}: done in {result['wall_seconds']} s", file=sys.stderr, flush=True)
    return result


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
             f"ratio = x2x / peer.", ""]
    for engine, w in m.get("broker_warm_up", {}).items():
        lines += [f"{engine} warmed for {w['seconds']:.0f} s before its first scenario "
                  f"({w['rounds']} rounds of produce and fetch; 4 KiB records at depth "
                  f"16: {w['first_records_per_s']:,}/s in the first round, "
                  f"{w['last_records_per_s']:,}/s in the last).", ""]
    for r in m.get("reruns", []):
        lines += [f"Rerun at {r['at']}, on brokers of their own (warmed as above): "
                  f"{', '.join(r['scenarios'])}.", ""]
    lines += ["| scenario | metric | unit | x2x | peer | peer value | ratio | better |",
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
