"""Scenario 7: peak RSS of the capturer and the applier, run as the CLI runs them
(``x2x capture NAME --once``, ``x2x apply NAME --until-caught-up``), on a small and an
8x larger volume of the same shape (30% data). Memory should be bounded by the
publisher's in-flight window and the applier's staging budget, not by the volume: the
figure is large / small, ideally near 1. Peak RSS is each child's VmHWM, polled from
/proc while it runs (see bench.common.finish). The peaks of every other x2x child of the
run are listed as well.
"""
from __future__ import annotations

from typing import Any

from bench.common import (GiB, MiB, Context, delete_pair, figure, make_pair, run_x2x,
                          same_volume, sparse_image)

TITLE = "Memory: peak RSS of capturer and applier, small vs 8x larger volume"


def measure(ctx: Context, size: int, seed: int) -> dict[str, Any]:
    d = ctx.dir(f"memory-{size // MiB}m")
    src = sparse_image(d / "src.img", size, 0.30, seed=seed)
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


def run(ctx: Context) -> dict[str, Any]:
    small = measure(ctx, ctx.size(256 * MiB, 16 * MiB), 71)
    large = measure(ctx, ctx.size(2 * GiB, 64 * MiB), 72)
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
        ],
        "details": {"small": small, "large": large,
                    "all_children": [r for r in ctx.rss if r["scenario"] != "memory"]},
    }
