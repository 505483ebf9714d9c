"""The x2x instruments are emitted with their names, values and attributes: read back
through OpenTelemetry's in-memory reader, and over real OTLP/HTTP to a local receiver."""
from __future__ import annotations

import http.server
import subprocess
import sys
import threading

import pytest

from infra import telemetry


@pytest.fixture
def mem():
    tel, reader, spans = telemetry.setup_in_memory()
    yield tel, reader, spans
    telemetry.setup("none")


def test_counters_gauges_and_histogram_are_read_back(mem) -> None:
    _, reader, _ = mem
    m = telemetry.metrics()
    m.captured("web", ops=3, nbytes=3 * 65536)
    m.captured("web", ops=2, nbytes=4096)
    m.applied("web", ops=4, nbytes=70000, target="/images/web.img")
    m.lag("web", ops=1, nbytes=4096, rpo_s=2.5, target="/images/web.img")
    m.checkpoint_age("web", 7.0, target="/images/web.img")
    m.unjournaled("web", 16 << 20, 1.5)
    m.progress("db", "capturer", 0.25)
    m.progress("db", "capturer", 0.5)      # a gauge reports the last value
    m.nbd_request("web", "write", 0.0004)
    m.nbd_request("web", "write", 0.003)
    m.nbd_request("web", "flush", 0.02)
    m.journal_acked("web", 0.0007)
    m.journal_acked("web", 0.004)

    got = telemetry.points(reader)
    cap = {"pair": "web", "role": "capturer"}
    app = {"pair": "web", "role": "applier", "target": "/images/web.img"}
    assert got["x2x.captured.ops"] == [(cap, 5)]
    assert got["x2x.captured.bytes"] == [(cap, 3 * 65536 + 4096)]
    assert got["x2x.applied.ops"] == [(app, 4)]
    assert got["x2x.applied.bytes"] == [(app, 70000)]
    assert got["x2x.lag.ops"] == [(app, 1.0)]
    assert got["x2x.lag.bytes"] == [(app, 4096.0)]
    assert got["x2x.rpo"] == [(app, 2.5)]
    assert got["x2x.checkpoint.age"] == [(app, 7.0)]
    assert got["x2x.unjournaled.bytes"] == [(cap, float(16 << 20))]
    assert got["x2x.unjournaled.age"] == [(cap, 1.5)]
    assert got["x2x.resync.progress"] == [({"pair": "db", "role": "capturer"}, 0.5)]
    hist = {a["command"]: dp for a, dp in got["x2x.nbd.request.duration"]}
    assert hist["write"].count == 2 and hist["write"].sum == pytest.approx(0.0034)
    assert hist["flush"].count == 1
    # Seconds-scale buckets, not the SDK's millisecond defaults.
    assert tuple(hist["write"].explicit_bounds) == telemetry.LATENCY_BUCKETS_S
    assert hist["write"].bucket_counts[telemetry.LATENCY_BUCKETS_S.index(0.0005)] == 1
    [(attrs, acks)] = got["x2x.journal.ack.duration"]
    assert attrs == cap and acks.count == 2 and acks.sum == pytest.approx(0.0047)
    assert tuple(acks.explicit_bounds) == telemetry.LATENCY_BUCKETS_S


def test_the_history_base_reports_held_bytes_window_and_early_applies(mem) -> None:
    _, reader, _ = mem
    m = telemetry.metrics()
    m.history("web", "/b.img", held=5000, window_s=60.0, early=False)
    m.history("web", "/b.img", held=9000, window_s=30.0, early=True)
    got = telemetry.points(reader)
    a = {"pair": "web", "role": "base", "target": "/b.img"}
    assert got["x2x.history.held"] == [(a, 9000.0)]
    assert got["x2x.history.window"] == [(a, 30.0)]
    assert got["x2x.history.early"] == [(a, 1)]


def test_unknown_lag_stops_reporting_the_series(mem) -> None:
    _, reader, _ = mem
    m = telemetry.metrics()
    m.lag("web", ops=5, nbytes=10, rpo_s=1.0)
    m.lag("web", ops=None, nbytes=None, rpo_s=None)   # capturer not seen: unknown
    got = telemetry.points(reader)
    assert "x2x.lag.ops" not in got and "x2x.rpo" not in got


def test_span_records_attributes_and_errors(mem) -> None:
    _, _, spans = mem
    with telemetry.span("x2x.failover", pair="web", force=True):
        pass
    with pytest.raises(RuntimeError):
        with telemetry.span("x2x.resync", pair="db"):
            raise RuntimeError("digest mismatch")
    done = {s.name: s for s in spans.get_finished_spans()}
    assert dict(done["x2x.failover"].attributes) == {"pair": "web", "force": True}
    assert done["x2x.failover"].status.status_code.name == "UNSET"
    assert done["x2x.resync"].status.status_code.name == "ERROR"
    assert done["x2x.resync"].events[0].name == "exception"


def test_no_exporter_configured_is_a_no_op(monkeypatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_METRICS_EXPORTER",
                "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    tel = telemetry.setup()
    assert tel.exporter == "none"
    telemetry.metrics().captured("web", 1, 1)     # accepted, goes nowhere
    with telemetry.span("x2x.baseline", pair="web"):
        pass


def test_bad_exporter_is_refused_with_advice() -> None:
    from journal.errors import BadInput
    with pytest.raises(BadInput, match="otlp, console, none"):
        telemetry.setup("prometheus")


def test_otlp_http_export_reaches_a_collector(monkeypatch) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone switches on OTLP/HTTP export."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest)
    received: dict[str, bytes] = {}

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            received[self.path] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT",
                           f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "x2x-capture-web")
        tel = telemetry.setup()
        assert tel.exporter == "otlp"
        telemetry.metrics().captured("web", ops=7, nbytes=7000)
        with telemetry.span("x2x.failback", pair="web"):
            pass
        tel.flush()
    finally:
        telemetry.setup("none")
        server.shutdown()
    assert "/v1/traces" in received
    req = ExportMetricsServiceRequest.FromString(received["/v1/metrics"])
    rm = req.resource_metrics[0]
    service = {a.key: a.value.string_value for a in rm.resource.attributes}["service.name"]
    assert service == "x2x-capture-web"
    sums = {m.name: m.sum.data_points[0] for sm in rm.scope_metrics for m in sm.metrics
            if m.HasField("sum")}
    assert sums["x2x.captured.ops"].as_int == 7
    assert {a.key: a.value.string_value for a in sums["x2x.captured.ops"].attributes} == {
        "pair": "web", "role": "capturer"}


def test_console_exporter_writes_to_stderr_not_stdout() -> None:
    code = ("from infra import telemetry\n"
            "t = telemetry.setup('console')\n"
            "telemetry.metrics().captured('web', 2, 20)\n"
            "t.flush()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "x2x.captured.ops" in proc.stderr
