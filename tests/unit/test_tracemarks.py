"""Trace capture's pure logic (journal/tracemarks.py): completed requests -> dirty
blocks, freeze figures."""
from __future__ import annotations

from journal.blocks import Extent
from journal.tracemarks import DirtyBlocks, FreezeTimes, parse_changes, split_lines

RQ = (b"  kworker/1:1H-123 [001] d..1. 100.000001: block_rq_complete: 7,3 WS () "
      b"2048 + 8 be,0,4 [0]\n")
TEXT = (RQ
        + b"  loop3-9 [000] ..... 100.1: block_rq_complete: 7,3 R () 4096 + 256 be,0,4 [0]\n"
        + b"  loop3-9 [000] ..... 100.2: block_rq_complete: 7,3 FF () 0 + 0 none,0,0 [0]\n"
        + b"  loop3-9 [000] ..... 100.3: block_rq_complete: 7,3 WSM () 16 + 2 be,0,4 [0]\n"
        + b"  loop3-9 [000] ..... 100.4: block_rq_complete: 7,3 D () 1000000 + 2048 "
          b"be,0,4 [0]\n"
        + b"  dm-0-9 [000] ..... 100.5: block_bio_complete: 253,0 N 8 + 8 [0]\n"
        + b"  <...>-1 [000] ..... 100.6: tracing_mark_write: x2x-cut-1-2\n")


def test_parse_changes_keeps_writes_discards_and_zeroes_not_reads_or_flushes():
    assert list(parse_changes(TEXT)) == [(2048 * 512, 8 * 512), (16 * 512, 2 * 512),
                                         (1000000 * 512, 2048 * 512), (8 * 512, 8 * 512)]


def test_split_lines_keeps_an_unfinished_line_for_the_next_read():
    whole, tail = split_lines(b"", RQ + RQ[:30])
    assert whole == RQ and tail == RQ[:30]
    whole, tail = split_lines(tail, RQ[30:])
    assert whole == RQ and tail == b""


def test_dirty_blocks_mark_clip_coalesce_and_empty_on_take():
    d = DirtyBlocks(block_size=4096, volume_size=10 * 4096, max_extent=2 * 4096)
    d.mark(100, 10)             # block 0
    d.mark(4096 * 2 - 1, 2)     # blocks 1 and 2
    d.mark(4096 * 9, 1 << 20)   # block 9, clipped to the volume
    d.mark(4096 * 20, 10)       # outside: nothing
    d.mark(-8192, 4096)         # before the volume (a partition's disk): nothing
    assert len(d) == 4 and d.bytes == 4 * 4096
    assert d.take() == [Extent(0, 8192), Extent(8192, 4096), Extent(9 * 4096, 4096)]
    assert d.take() == [] and len(d) == 0


def test_freeze_times_percentiles_and_counts():
    t = FreezeTimes()
    for ms in range(1, 101):
        t.add(ms / 1000, abandoned=ms > 98)
    assert t.percentile(50) == 0.05 and t.percentile(99) == 0.099
    d = t.detail()
    assert d["cuts"] == "100" and d["cuts_abandoned"] == "2" and d["freeze_max_ms"] == "100.0"
    assert FreezeTimes().percentile(99) == 0.0


def test_status_shows_the_trace_capturer_with_its_freeze_figures():
    from cli.status import _capture_cell
    t = FreezeTimes()
    t.add(0.012)
    t.add(0.030, abandoned=True)
    cell = _capture_cell("capturing", {"capturer": "trace", "mount": "/srv", "lost_events":
                                       "3", "compares": "1", "dirty_bytes": "65536",
                                       **t.detail()})
    assert cell.startswith("capturing (trace, freezing /srv, 2 cuts, 1 abandoned, "
                           "freeze p50 12.0 ms, p99 30.0 ms, max 30.0 ms"), cell
    assert "3 trace events lost, 1 hash compares" in cell and "64.0 KiB marked" in cell, cell
