"""Scenario 7: peak RSS of the capturer and the applier, run as the CLI runs them
(``x2x capture NAME --once``, ``x2x apply NAME --until-caught-up``), on a small and an
8x larger volume of the same shape (30% data), and on two mostly empty ones (0.05% data,
4 and 64 GiB). Memory should be bounded by the publisher's in-flight window and the
applier's staging budget, not by the volume: the figure is large / small, ideally near
1. What does grow with the volume is the capturer's block hash map, 32 bytes a block
(0.5 MiB a GiB in 64 KiB blocks): the mostly empty volume shows it alone. Peak RSS is each child's VmHWM, polled from
/proc while it runs (see bench.common.finish). The peaks of every other x2x child of the
run are listed as well.
"""
from __future__ import annotations

from typing import Any

from journal.blocks import HASH_LEN, block_count

from bench.common import (GiB, MiB, Context, delete_pair, figure, make_pair, run_x2x,
                          same_volume, sparse_image)

TITLE = "Memory: peak RSS of capturer and applier, small vs 8x larger volume"


def measure(ctx: Context, size: int, seed: int, data: float = 0.30) -> dict[str, Any]:
    d = ctx.dir(f"memory-{size // MiB}m")
    src = sparse_image(d / "src.img", size, data, seed=seed)
    spec = make_pair(ctx, "memory", src, d / "dst.img")
    cap = run_x2x(ctx, "capture", spec.name, "--once", "--json", role="capturer",
                  scenario="memory")
    app = run_x2x(ctx, "apply", spec.name, "--until-caught-up", "--json", role="applier",
                  scenario="memory")
    ok = same_volume(src, spec.target)
    delete_pair(ctx, spec)
    src.unlink()
    (d / "dst.img").unlink()
    return {"volume_bytes": size, "capturer_max_rss": cap.max_rss_bytes,
            "applier_max_rss": app.max_rss_bytes, "capture_s": cap.seconds,
            "apply_s": app.seconds, "identical": ok}


def _map_mib(res: dict[str, Any]) -> float:
    """The capturer's block hash map for that volume, in MiB (64 KiB blocks)."""
    return block_count(res["volume_bytes"], 64 << 10) * HASH_LEN / MiB


def run(ctx: Context) -> dict[str, Any]:
    small = measure(ctx, ctx.size(256 * MiB, 16 * MiB), 71)
    large = measure(ctx, ctx.size(2 * GiB, 64 * MiB), 72)
    empty = measure(ctx, ctx.size(64 * GiB, 1 * GiB), 73, data=0.0005)
    empty_small = measure(ctx, ctx.size(4 * GiB, 64 * MiB), 74, data=0.0005)
    label = f"small volume ({small['volume_bytes'] // MiB} MiB)"
    return {
        "title": TITLE,
        "sizes": {"small_bytes": small["volume_bytes"], "large_bytes": large["volume_bytes"]},
        "figures": [
            figure(f"capturer peak RSS, {large['volume_bytes'] // MiB} MiB volume", "MiB",
                   large["capturer_max_rss"] / MiB, label, small["capturer_max_rss"] / MiB,
                   "lower"),
            figure(f"applier peak RSS, {large['volume_bytes'] // MiB} MiB volume", "MiB",
                   large["applier_max_rss"] / MiB, label, small["applier_max_rss"] / MiB,
                   "lower"),
            figure(f"capturer peak RSS, {empty['volume_bytes'] / GiB:g} GiB volume, 0.05 % "
                   f"data (hash map {_map_mib(empty):g} MiB)", "MiB",
                   empty["capturer_max_rss"] / MiB,
                   f"{empty_small['volume_bytes'] / GiB:g} GiB volume, 0.05 % data (hash "
                   f"map {_map_mib(empty_small):g} MiB)", empty_small["capturer_max_rss"] / MiB,
                   "lower"),
        ],
        "details": {"small": small, "large": large, "mostly_empty": empty,
                    "mostly_empty_small": empty_small,
                    "all_children": [r for r in ctx.rss if r["scenario"] != "memory"]},
    }
