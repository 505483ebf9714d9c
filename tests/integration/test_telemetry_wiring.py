"""The services really emit their metrics (read back with an in-memory reader)."""
from __future__ import annotations

from consumers.applier import Applier
from infra import telemetry
from producers.scan import scan_once
from tests.conftest import make_image
from tests.integration.test_replication import create

MiB = 1 << 20


def test_applier_emits_applied_bytes_and_checkpoint_age(settings, pair_name, tmp_path):
    _, reader, _ = telemetry.setup_in_memory()
    try:
        src = make_image(tmp_path / "src.img", 4 * MiB, seed=9, data_fraction=1.0)
        spec = create(settings, pair_name, src, tmp_path / "dst.img")
        scan_once(spec, settings)
        stats = Applier(spec, spec.target, settings).run(until_caught_up=True)
        points = telemetry.points(reader)
        applied = [(a, v) for a, v in points["x2x.applied.bytes"] if a["pair"] == pair_name]
        assert applied and applied[0][1] == stats.bytes_applied == 4 * MiB
        assert applied[0][0]["target"] == spec.target
        assert any(a["pair"] == pair_name for a, _ in points["x2x.checkpoint.age"])
    finally:
        telemetry.setup("none")


def test_capturer_emits_journaled_ops_nbd_latency_progress_and_a_baseline_span(
        settings, pair_name, tmp_path):
    import shutil
    import subprocess

    import pytest

    from producers.nbd_capture import NBDCapture
    from tests.integration.test_nbd_capture import make_pair, wait_baseline
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed (apt-get install qemu-utils)")
    _, reader, spans = telemetry.setup_in_memory()
    cap = None
    try:
        spec = make_pair(settings, pair_name, tmp_path, 4 * MiB, seed=10, data_fraction=0.5)
        cap = NBDCapture(spec, settings, "127.0.0.1", 0).start()
        wait_baseline(cap)
        p = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 64k", "-c", "flush",
                            cap.uri], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        cap.beat(force=True)
        cap.stop()
        cap = None
        points = telemetry.points(reader)
        ops = sum(v for a, v in points["x2x.captured.ops"] if a["pair"] == pair_name)
        assert ops >= 2            # the baseline's ops, the write and its FLUSH
        assert sum(v for a, v in points["x2x.captured.bytes"]
                   if a["pair"] == pair_name) >= 64 * 1024
        commands = {a["command"] for a, _ in points["x2x.nbd.request.duration"]
                    if a["pair"] == pair_name}
        assert {"write", "flush"} <= commands, commands
        acks = [dp for a, dp in points["x2x.journal.ack.duration"] if a["pair"] == pair_name]
        assert acks and acks[0].count >= 2 and acks[0].sum > 0, acks
        assert any(a == {"pair": pair_name, "role": "capturer"} and v == 1.0
                   for a, v in points["x2x.resync.progress"])
        names = [s.name for s in spans.get_finished_spans()
                 if s.attributes.get("pair") == pair_name]
        assert "x2x.baseline" in names, names
    finally:
        if cap is not None:
            cap.stop()
        telemetry.setup("none")


def test_a_replica_build_is_a_span(settings, pair_name, tmp_path):
    from consumers.replica import build, make_limit
    _, _, spans = telemetry.setup_in_memory()
    try:
        src = make_image(tmp_path / "src.img", 1 * MiB, seed=11, data_fraction=1.0)
        spec = create(settings, pair_name, src, tmp_path / "dst.img")
        last = scan_once(spec, settings).last_seq
        build(spec, str(tmp_path / "replica.img"), settings,
              make_limit(settings, pair_name, None, f"1:{last}", None))
        found = [s for s in spans.get_finished_spans() if s.name == "x2x.replica.build"]
        assert found and found[0].attributes["pair"] == pair_name
    finally:
        telemetry.setup("none")
