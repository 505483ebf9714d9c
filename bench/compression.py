"""Scenario: Kafka's own compression (librdkafka ``compression.type`` and
``compression.level``) of journal records on realistic data, to choose x2x's default.

The data: an ext4 filesystem image made with ``mke2fs -d`` from a directory holding
text (Python's standard library sources and the system's licence texts), binaries
(files of /usr/bin) and a database (SQLite, an orders table with names, amounts, dates
and free text), about a third each, plus the filesystem's own metadata. Its non-zero
64 KiB blocks (zero blocks are ZERO ops, never compressed data) are produced as records
of the journal's size (960 KiB) to a topic of their own per codec, exactly as the
journal publisher produces them (infra/kafka.py settings, compression overridden).

Per codec: the ratio (bytes on the wire, librdkafka's ``txbytes``, over record bytes) and
the producer process's CPU seconds per GiB of records (every librdkafka thread counts),
beside ``none``. The 'x2x' column is the default in infra/kafka.py, the peer each codec.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from bench.common import GiB, MiB, Context, figure, produce, require

TITLE = "Kafka compression of journal records on an ext4 image (text, binaries, database)"
RECORD = 960 * 1024
BLOCK = 64 * 1024
#: (name, compression.type, compression.level or None).
CODECS = [("none", "none", None), ("lz4", "lz4", None), ("zstd:1", "zstd", 1),
          ("zstd:3", "zstd", 3), ("zstd:6", "zstd", 6), ("zstd:9", "zstd", 9)]


def _fill(root: Path, budget: int) -> dict[str, int]:
    """About ``budget`` bytes: a third text, a third binaries, a third database."""
    third = budget // 3
    sizes = {"text": 0, "binaries": 0, "database": 0}
    text = root / "text"
    text.mkdir(parents=True)
    sources = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")) + sorted(
        Path("/usr/share/common-licenses").glob("*"))
    for i, f in enumerate(sources):
        if sizes["text"] >= third:
            break
        if f.is_file():
            shutil.copyfile(f, text / f"{i}-{f.name}")
            sizes["text"] += f.stat().st_size
    bins = root / "bin"
    bins.mkdir()
    for f in sorted(Path("/usr/bin").iterdir()):
        if sizes["binaries"] >= third:
            break
        if f.is_file() and not f.is_symlink() and f.stat().st_size < third // 4:
            shutil.copyfile(f, bins / f.name)
            sizes["binaries"] += f.stat().st_size
    rng = random.Random(7)
    words = [w for w in (text / next(iter(os.listdir(text)))).read_text(
        errors="replace").split() if w.isalpha()][:500] or ["order", "paid", "shipped"]
    db = sqlite3.connect(root / "shop.db")
    db.execute("create table orders (id integer primary key, customer text, email text, "
               "amount real, placed text, note text)")
    db.execute("create index by_customer on orders(customer)")
    n = 0
    while (root / "shop.db").stat().st_size < third:
        rows = [(f"{rng.choice(words).title()} {rng.choice(words).title()}",
                 f"{rng.choice(words).lower()}{rng.randrange(1000)}@example.com",
                 round(rng.uniform(1, 5000), 2),
                 f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
                 " ".join(rng.choice(words) for _ in range(rng.randrange(3, 30))))
                for _ in range(5000)]
        db.executemany("insert into orders (customer, email, amount, placed, note) "
                       "values (?, ?, ?, ?, ?)", rows)
        db.commit()
        n += len(rows)
    db.close()
    sizes["database"] = (root / "shop.db").stat().st_size
    return sizes


def make_image(d: Path, size: int) -> tuple[Path, dict[str, int]]:
    root = d / "content"
    if root.exists():
        shutil.rmtree(root)
    sizes = _fill(root, int(size * 0.7))
    img = d / "fs.img"
    img.unlink(missing_ok=True)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(img),
                    f"{size // 1024}k"], check=True, capture_output=True)
    shutil.rmtree(root)
    return img, sizes


def records(img: Path) -> list[bytes]:
    """The image's non-zero blocks, packed into journal-sized records."""
    out, cur = [], bytearray()
    zero = bytes(BLOCK)
    with open(img, "rb") as f:
        while block := f.read(BLOCK):
            if block == zero[:len(block)]:
                continue
            cur += block
            if len(cur) + BLOCK > RECORD:
                out.append(bytes(cur))
                cur = bytearray()
    if cur:
        out.append(bytes(cur))
    return out


def measure(ctx: Context, recs: list[bytes], ctype: str, level: int | None,
            topic: str) -> dict[str, float]:
    """Produce every record once; CPU seconds and bytes on the wire."""
    from confluent_kafka import Producer
    from infra.topics import JOURNAL_CONFIG, ensure_topic
    ensure_topic(ctx.settings.check_reachable(), topic, JOURNAL_CONFIG)
    stats: list[dict] = []
    extra: dict[str, Any] = {"compression.type": ctype, "statistics.interval.ms": 100,
                             "stats_cb": lambda s: stats.append(json.loads(s))}
    if level is not None:
        extra["compression.level"] = level
    p = Producer(ctx.settings.producer(**extra))
    p.list_topics(topic, timeout=10)          # connected before the clock starts
    p.poll(0.3)
    stats.clear()
    cpu0, t0 = time.process_time(), time.monotonic()
    for r in recs:
        produce(p, topic, r)
    p.flush(120)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    time.sleep(0.3)
    p.poll(0.3)
    tx = max(sum(b.get("txbytes", 0) for name, b in s["brokers"].items()
                 if not name.startswith("GroupCoordinator")) for s in stats)
    return {"cpu_s": cpu, "wall_s": wall, "wire_bytes": tx}


def run(ctx: Context) -> dict[str, Any]:
    if reason := require("mke2fs"):
        return {"skipped": reason}
    from infra.kafka import KafkaSettings
    d = ctx.dir("compression")
    img, content = make_image(d, ctx.size(512 * MiB, 48 * MiB))
    recs = records(img)
    raw = sum(len(r) for r in recs)
    rounds = 1 if ctx.quick else 3
    rows: dict[str, dict[str, float]] = {}
    for name, ctype, level in CODECS:
        topic = f"x2x.bench.compression.{name.replace(':', '-')}.{os.getpid()}"
        runs = [measure(ctx, recs, ctype, level, f"{topic}.{i}") for i in range(rounds)]
        best = min(runs, key=lambda r: r["cpu_s"])
        rows[name] = {"ratio": best["wire_bytes"] / raw,
                      "cpu_s_per_gib": best["cpu_s"] / raw * GiB,
                      "mb_per_cpu_s": raw / best["cpu_s"] / 1e6,
                      "wall_s": best["wall_s"]}
    base = rows["none"]["cpu_s_per_gib"]
    for r in rows.values():
        r["compress_cpu_s_per_gib"] = max(0.0, r["cpu_s_per_gib"] - base)
    default = KafkaSettings.resolve().compression
    mine = rows[default] if default in rows else rows["lz4"]
    figures = []
    for name, r in rows.items():
        if name == "none":
            continue
        figures.append(figure(f"wire/raw, {default} vs {name}", "ratio", mine["ratio"],
                              name, r["ratio"], "lower"))
        figures.append(figure(f"CPU per GiB, {default} vs {name}", "s/GiB",
                              mine["cpu_s_per_gib"], name, r["cpu_s_per_gib"], "lower"))
    print(f"[bench] compression: {raw / MiB:.0f} MiB of records "
          + ", ".join(f"{n} {r['ratio']:.3f} / {r['cpu_s_per_gib']:.1f} s/GiB"
                      for n, r in rows.items()), file=sys.stderr, flush=True)
    return {"title": TITLE,
            "sizes": {"image_bytes": img.stat().st_size, "record_bytes": raw, **{
                f"{k}_bytes": v for k, v in content.items()}},
            "figures": figures,
            "details": {"default": default, "codecs": rows, "rounds": rounds}}
