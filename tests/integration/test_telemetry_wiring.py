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
