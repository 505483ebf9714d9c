"""OpenTelemetry for x2x: providers from the standard ``OTEL_*`` variables, and every x2x
instrument defined here, once, behind a small typed API.

Exporters, decided by :func:`setup`:

- ``exporter="console"`` (``--telemetry console``): metrics and spans printed as JSON to
  *stderr*, so that ``--json`` output on stdout stays parseable;
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the per-signal ``..._METRICS_ENDPOINT`` /
  ``..._TRACES_ENDPOINT``) set: OTLP over HTTP/protobuf, configured by the exporter from
  the usual ``OTEL_EXPORTER_OTLP_*`` variables (headers, timeout, certificate);
- otherwise nothing: the API's no-op providers, so that calls cost next to nothing.

``OTEL_METRICS_EXPORTER`` / ``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``, ``none``) and
``OTEL_SDK_DISABLED=true`` are honoured; the resource comes from ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES``; the export interval from ``OTEL_METRIC_EXPORT_INTERVAL``.

Services do not build instruments: they call :func:`metrics` (after the CLI called
:func:`setup`) and :func:`span`. Gauges are observable: a service ``set``s the latest value
and the SDK reads it at each export, so there is no per-sample cost.

Attributes are the same everywhere: ``pair``, ``role`` (``capturer``/``applier``/
``replica``), and ``command`` for NBD requests, ``target`` where one pair has several.
"""
from __future__ import annotations

import functools
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.metrics import CallbackOptions, Meter, Observation

from journal.errors import BadInput

F = TypeVar("F", bound=Callable[..., Any])

SCOPE = "x2x"
EXPORTERS = ("otlp", "console", "none")
#: NBD latencies span ~50 µs (cache hit) to seconds (a stalled journal): the SDK's
#: default buckets (0..10000, meant for milliseconds) would put them all in one bucket.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Attrs = Mapping[str, str]


class Gauge:
    """An observable gauge fed by ``set``: the last value per attribute set is reported."""

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._values: dict[frozenset[tuple[str, str]], float] = {}
        self._lock = threading.Lock()
        meter.create_observable_gauge(name, callbacks=[self._observe], unit=unit,
                                      description=description)

    def set(self, value: float, **attrs: str) -> None:
        with self._lock:
            self._values[frozenset(attrs.items())] = float(value)

    def forget(self, **attrs: str) -> None:
        """Stop reporting a series (a pair deleted, a replica finished)."""
        with self._lock:
            self._values.pop(frozenset(attrs.items()), None)

    def _observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(v, dict(k)) for k, v in self._values.items()]


@dataclass
class Metrics:
    """Every x2x instrument. Use the typed methods; the instruments are public for tests."""

    meter: Meter
    captured_ops: Any = field(init=False)
    captured_bytes: Any = field(init=False)
    applied_ops: Any = field(init=False)
    applied_bytes: Any = field(init=False)
    lag_ops: Gauge = field(init=False)
    lag_bytes: Gauge = field(init=False)
    rpo_seconds: Gauge = field(init=False)
    checkpoint_age_seconds: Gauge = field(init=False)
    unjournaled_bytes: Gauge = field(init=False)
    unjournaled_age_seconds: Gauge = field(init=False)
    resync_progress: Gauge = field(init=False)
    history_held: Gauge = field(init=False)
    history_window: Gauge = field(init=False)
    history_early: Any = field(init=False)
    nbd_request_latency_seconds: Any = field(init=False)
    journal_ack_seconds: Any = field(init=False)
    target_flush_seconds: Any = field(init=False)

    def __post_init__(self) -> None:
        m = self.meter
        # OpenTelemetry names (dots, unit apart); a Prometheus exporter turns them into
        # x2x_captured_ops_total, x2x_nbd_request_duration_seconds, ...
        self.captured_ops = m.create_counter(
            "x2x.captured.ops", "{op}", "Ops the capturer journaled (acknowledged by Kafka).")
        self.captured_bytes = m.create_counter(
            "x2x.captured.bytes", "By", "Volume bytes covered by journaled ops.")
        self.applied_ops = m.create_counter(
            "x2x.applied.ops", "{op}", "Ops the applier wrote to its target.")
        self.applied_bytes = m.create_counter(
            "x2x.applied.bytes", "By", "Volume bytes the applier wrote to its target.")
        self.lag_ops = Gauge(m, "x2x.lag.ops", "{op}",
                             "Ops acknowledged to a client (journaled or not) and not yet "
                             "applied on the target (from journal seqs).")
        self.lag_bytes = Gauge(m, "x2x.lag.bytes", "By",
                               "Bytes acknowledged to a client and not yet applied.")
        self.rpo_seconds = Gauge(m, "x2x.rpo", "s",
                                 "Recovery point: age of the oldest write acknowledged to a "
                                 "client and not yet applied on the target (at most).")
        self.checkpoint_age_seconds = Gauge(m, "x2x.checkpoint.age", "s",
                                            "Time since the applier's last checkpoint.")
        self.unjournaled_bytes = Gauge(
            m, "x2x.unjournaled.bytes", "By",
            "Bytes acknowledged to clients that the broker does not hold yet (held on "
            "the source, queued, spooled, in flight).")
        self.unjournaled_age_seconds = Gauge(
            m, "x2x.unjournaled.age", "s",
            "Age of the oldest write acknowledged to a client that the broker does not "
            "hold yet (0: none).")
        self.resync_progress = Gauge(m, "x2x.resync.progress", "1",
                                     "Fraction (0..1) of a baseline/resync/replica build.")
        self.history_held = Gauge(m, "x2x.history.held", "By",
                                  "Journal payload bytes held on the broker (history base).")
        self.history_window = Gauge(m, "x2x.history.window", "s",
                                    "Actual history window: age of the oldest record kept.")
        self.history_early = m.create_counter(
            "x2x.history.early", "{cycle}",
            "Cycles in which the journal was over --journal-max and the base applied early.")
        self.nbd_request_latency_seconds = m.create_histogram(
            "x2x.nbd.request.duration", "s",
            "NBD request latency, from request read to reply sent.")
        self.journal_ack_seconds = m.create_histogram(
            "x2x.journal.ack.duration", "s",
            "How long Kafka took to acknowledge a journal record, from handing it to the "
            "producer to its delivery report (a sync write waits for one or two).")
        self.target_flush_seconds = m.create_histogram(
            "x2x.target.flush.duration", "s",
            "How long the target took to make applied writes durable (fsync) at a "
            "checkpoint; the RPO includes it.")

    # -- capturer ----------------------------------------------------------------------
    def captured(self, pair: str, ops: int, nbytes: int) -> None:
        """Ops journaled: call from the publisher's delivery report."""
        a = {"pair": pair, "role": "capturer"}
        self.captured_ops.add(ops, a)
        self.captured_bytes.add(nbytes, a)

    def nbd_request(self, pair: str, command: str, seconds: float) -> None:
        """One NBD request served; ``command`` is ``read``, ``write``, ``flush``, ``trim``,
        ``zero``, ``block_status`` ... (lower case)."""
        self.nbd_request_latency_seconds.record(
            seconds, {"pair": pair, "role": "capturer", "command": command})

    def journal_acked(self, pair: str, seconds: float) -> None:
        """One journal record acknowledged, ``seconds`` after it was handed to Kafka."""
        self.journal_ack_seconds.record(seconds, {"pair": pair, "role": "capturer"})

    def unjournaled(self, pair: str, nbytes: int, age_s: float) -> None:
        """What clients were told is done and the journal lacks (at every capturer beat)."""
        a = {"pair": pair, "role": "capturer"}
        self.unjournaled_bytes.set(nbytes, **a)
        self.unjournaled_age_seconds.set(age_s, **a)

    # -- applier -----------------------------------------------------------------------
    def applied(self, pair: str, ops: int, nbytes: int, target: str | None = None) -> None:
        """Ops written to a target (before fsync; checkpoints are their own gauge)."""
        a = _attrs(pair, "applier", target)
        self.applied_ops.add(ops, a)
        self.applied_bytes.add(nbytes, a)

    def lag(self, pair: str, ops: int | None, nbytes: int | None, rpo_s: float | None,
            target: str | None = None) -> None:
        """Lag and RPO as ``journal.status`` computes them; None = unknown, not reported."""
        a = _attrs(pair, "applier", target)
        for gauge, value in ((self.lag_ops, ops), (self.lag_bytes, nbytes),
                             (self.rpo_seconds, rpo_s)):
            if value is None:
                gauge.forget(**a)
            else:
                gauge.set(value, **a)

    def target_flush(self, pair: str, seconds: float, target: str | None = None) -> None:
        """One fsync of the target at a checkpoint."""
        self.target_flush_seconds.record(seconds, _attrs(pair, "applier", target))

    def checkpoint_age(self, pair: str, seconds: float, target: str | None = None) -> None:
        self.checkpoint_age_seconds.set(seconds, **_attrs(pair, "applier", target))

    # -- history base --------------------------------------------------------------------
    def history(self, pair: str, base: str, held: int | None, window_s: float | None,
                early: bool) -> None:
        """One cycle of the history base; None = unknown, not reported."""
        a = _attrs(pair, "base", base)
        for gauge, value in ((self.history_held, held), (self.history_window, window_s)):
            if value is None:
                gauge.forget(**a)
            else:
                gauge.set(value, **a)
        if early:
            self.history_early.add(1, a)

    # -- either side -------------------------------------------------------------------
    def progress(self, pair: str, role: str, fraction: float,
                 target: str | None = None) -> None:
        """Baseline, resync or replica build progress, 0..1 (1.0 when done)."""
        self.resync_progress.set(min(1.0, max(0.0, fraction)), **_attrs(pair, role, target))


def _attrs(pair: str, role: str, target: str | None) -> dict[str, str]:
    a = {"pair": pair, "role": role}
    if target is not None:
        a["target"] = target
    return a


@dataclass
class Telemetry:
    """The providers of this process and the instruments built on them."""

    meter_provider: otel_metrics.MeterProvider
    tracer_provider: otel_trace.TracerProvider
    metrics: Metrics
    exporter: str

    @property
    def tracer(self) -> otel_trace.Tracer:
        return self.tracer_provider.get_tracer(SCOPE)

    def flush(self) -> None:
        """Export now (before a short-lived command exits, or in tests)."""
        for p in (self.meter_provider, self.tracer_provider):
            if hasattr(p, "force_flush"):
                p.force_flush()

    def shutdown(self) -> None:
        for p in (self.meter_provider, self.tracer_provider):
            if hasattr(p, "shutdown"):
                p.shutdown()


def _noop() -> Telemetry:
    mp, tp = otel_metrics.NoOpMeterProvider(), otel_trace.NoOpTracerProvider()
    return Telemetry(mp, tp, Metrics(mp.get_meter(SCOPE)), "none")


_current = _noop()


def metrics() -> Metrics:
    """The process's instruments: no-ops until :func:`setup` ran. Fetch it after setup
    (when a service starts), not at import time."""
    return _current.metrics


def current() -> Telemetry:
    return _current


@contextmanager
def span(name: str, **attrs: Any) -> Iterator[otel_trace.Span]:
    """A span around a long operation (``x2x.failover``, ``x2x.failback``,
    ``x2x.replica.build``, ``x2x.resync``, ``x2x.baseline``); an exception leaving it is
    recorded and marks the span as an error. Attribute values: str, bool, int, float."""
    with _current.tracer.start_as_current_span(
            name, attributes={k: v for k, v in attrs.items() if v is not None}) as s:
        yield s


def traced(name: str) -> Callable[[F], F]:
    """Run ``f(op, ...)``, a long operation on the pair ``op.pair``, in a span ``name``
    carrying the pair's name."""
    def wrap(f: F) -> F:
        @functools.wraps(f)
        def inner(op: Any, *args: Any, **kw: Any) -> Any:
            with span(name, pair=str(op.pair)):
                return f(op, *args, **kw)
        return inner  # type: ignore[return-value]
    return wrap


def setup(exporter: str | None = None, service_name: str = "x2x",
          metric_readers: list[Any] | None = None,
          span_processors: list[Any] | None = None) -> Telemetry:
    """Install this process's providers (replacing earlier ones) and return them.

    ``exporter``: ``console``, ``otlp``, ``none``, or None to decide from ``OTEL_*``.
    ``metric_readers`` / ``span_processors``: extra ones, e.g. in-memory in tests.
    """
    global _current
    if exporter is not None and exporter not in EXPORTERS:
        raise BadInput(f"unknown telemetry exporter {exporter!r}; use one of "
                       f"{', '.join(EXPORTERS)} (OTLP is chosen by "
                       f"OTEL_EXPORTER_OTLP_ENDPOINT)")
    readers = list(metric_readers or [])
    processors = list(span_processors or [])
    m_kind, t_kind = _kind("METRICS", exporter), _kind("TRACES", exporter)
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        m_kind = t_kind = "none"
    if m_kind == "none" and t_kind == "none" and not readers and not processors:
        _current.shutdown()
        _current = _noop()
        return _current

    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, win over service_name.
    resource = Resource.create({SERVICE_NAME: service_name}).merge(Resource.create())
    if m_kind != "none":
        # The console is for a person watching: every 10 s unless told otherwise.
        interval = None if m_kind == "otlp" or "OTEL_METRIC_EXPORT_INTERVAL" in os.environ \
            else 10_000
        readers.append(PeriodicExportingMetricReader(_metric_exporter(m_kind),
                                                     export_interval_millis=interval))
    if t_kind != "none":
        processors.append(BatchSpanProcessor(_span_exporter(t_kind)))
    views = [View(instrument_name=name,
                  aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S))
             for name in ("x2x.nbd.request.duration", "x2x.journal.ack.duration")]
    mp = MeterProvider(resource=resource, metric_readers=readers, views=views)
    tp = TracerProvider(resource=resource)
    for p in processors:
        tp.add_span_processor(p)
    _current.shutdown()
    _current = Telemetry(mp, tp, Metrics(mp.get_meter(SCOPE)), exporter or m_kind)
    return _current


def setup_in_memory() -> tuple[Telemetry, Any, Any]:
    """For tests: install providers that keep everything in memory.

    Returns ``(telemetry, metric_reader, span_exporter)``: an ``InMemoryMetricReader``
    (``get_metrics_data()``, or :func:`points`) and an ``InMemorySpanExporter``
    (``get_finished_spans()``). No exporter from ``OTEL_*`` is added.
    """
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    reader, spans = InMemoryMetricReader(), InMemorySpanExporter()
    tel = setup("none", metric_readers=[reader], span_processors=[SimpleSpanProcessor(spans)])
    return tel, reader, spans


def points(reader: Any) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Collect from an in-memory reader: metric name -> [(attributes, value)], where the
    value is the number for sums and gauges and the data point itself for histograms."""
    out: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for dp in metric.data.data_points:
                    value = getattr(dp, "value", dp)
                    out.setdefault(metric.name, []).append((dict(dp.attributes), value))
    return out


def _kind(signal: str, asked: str | None) -> str:
    if asked is not None:
        return asked
    env = os.environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if env:
        if env not in EXPORTERS:
            raise BadInput(f"OTEL_{signal}_EXPORTER={env!r} is not supported by x2x; use "
                           f"{', '.join(EXPORTERS)}")
        return env
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))
    return "otlp" if endpoint else "none"


def _check_protocol() -> None:
    proto = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    if proto != "http/protobuf":
        raise BadInput(f"OTEL_EXPORTER_OTLP_PROTOCOL={proto!r}: x2x exports OTLP over "
                       f"http/protobuf only; unset it and point OTEL_EXPORTER_OTLP_ENDPOINT "
                       f"at the collector's HTTP port (usually 4318)")


def _metric_exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter
        return ConsoleMetricExporter(out=sys.stderr)
    _check_protocol()
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    except ImportError:
        raise BadInput(_MISSING_OTLP) from None
    return OTLPMetricExporter()


def _span_exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter(out=sys.stderr)
    _check_protocol()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise BadInput(_MISSING_OTLP) from None
    return OTLPSpanExporter()


_MISSING_OTLP = ("OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed; "
                 "run 'pip install opentelemetry-exporter-otlp-proto-http' in x2x's "
                 "environment, or unset the variable")
