"""make bench-quick never rots: every scenario runs at tiny sizes and reports numbers.

Shape only: benchmarks never assert timings.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_reports_every_scenario_with_figures(tmp_path):
    from bench.__main__ import SCENARIOS
    # The bench starts its own broker and X2X_HOME: it must not inherit the session's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("X2X_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["meta"]["quick"] is True
    assert list(doc["scenarios"]) == list(SCENARIOS)
    for name, result in doc["scenarios"].items():
        assert "error" not in result, (name, result["error"])
        if "skipped" in result:
            assert isinstance(result["skipped"], str) and result["skipped"], name
            continue
        assert result["figures"], name
        for f in result["figures"]:
            for key in ("x2x", "peer", "ratio"):
                assert isinstance(f[key], (int, float)) and math.isfinite(f[key]), (name, f)
            assert f["peer_name"] and f["better"] in ("higher", "lower"), (name, f)
    md = (tmp_path / "latest.md").read_text()
    assert all(f"| {name} |" in md for name in SCENARIOS)
    assert md in proc.stdout
