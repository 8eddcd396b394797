"""Prometheus metrics, exposed through prometheus-client's custom-collector interface.

The relay and the responses count into plain attributes (``metrics.bytes_sent += n``)
because that runs once per token: an int add costs a fraction of prometheus-client's
``Counter.inc()``, which takes a lock.  :class:`Metrics` is a collector that turns the
attributes into metric families only when ``/metrics`` is scraped, and each instance has
its own ``CollectorRegistry`` (never the global ``REGISTRY``), so several apps can live
in one process.

Multiprocess mode does not see custom collectors, so with several workers each would add
its deltas to prometheus-client's own Counter/Histogram objects now and then, off the
per-token path, with ``active_streams`` as a ``livesum`` gauge, and ``/metrics`` would
serve a ``MultiProcessCollector``.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Per-bucket counts as plain ints; cumulative only when collected."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket, as le ("<=") means.
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def collect(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            # le="1", not prometheus-client's "1.0": a new label value would start a new series.
            buckets.append((f"{bound:g}", cumulative))
        buckets.append(("+Inf", self.count))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


def _by_label(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class Metrics(Collector):
    """What the relay and the responses count; rendered by ``GET /metrics``."""

    def __init__(self, active_streams: Callable[[], int] = lambda: 0) -> None:
        # A gauge read from the relay's own table when collected: never a second count that can drift.
        self._active_streams = active_streams
        self.streams_started = 0
        self.time_to_first_token = Histogram()
        self.inter_token_delay = Histogram()
        self.cancellations: dict[str, int] = defaultdict(int)  # by phase
        self.upstream_errors: dict[str, int] = defaultdict(int)  # by error type
        self.finished: dict[str, int] = defaultdict(int)  # by finish_reason / error type
        self.bytes_sent = 0
        self.clients_dropped = 0  # stopped reading past the send timeout
        self.refused: dict[str, int] = defaultdict(int)  # requests refused, by error type
        self.registry = CollectorRegistry()
        self.registry.register(self)

    @property
    def active_streams(self) -> int:
        return self._active_streams()

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("tokenwire_streams_started_total", "Streams started.", self.streams_started)
        yield GaugeMetricFamily("tokenwire_active_streams", "Generations running now.", self.active_streams)
        yield self.time_to_first_token.collect(
            "tokenwire_time_to_first_token_seconds", "From stream start to the first token."
        )
        yield self.inter_token_delay.collect(
            "tokenwire_inter_token_delay_seconds", "Between two tokens from the model."
        )
        yield _by_label(
            "tokenwire_cancellations_total", "Cancelled generations by phase.", "phase", self.cancellations
        )
        yield _by_label(
            "tokenwire_upstream_errors_total", "Generations ended by an error, by type.", "type",
            self.upstream_errors,
        )
        yield _by_label(
            "tokenwire_streams_finished_total", "Streams ended, by outcome.", "outcome", self.finished
        )
        yield _by_label(
            "tokenwire_requests_refused_total", "Requests refused before streaming, by type.", "type",
            self.refused,
        )
        yield CounterMetricFamily(
            "tokenwire_bytes_sent_total", "Event-stream bytes written to clients.", self.bytes_sent
        )
        yield CounterMetricFamily(
            "tokenwire_clients_dropped_total", "Clients dropped for not reading.", self.clients_dropped
        )

    def render(self) -> bytes:
        """The text exposition format; serve it as ``prometheus_client.CONTENT_TYPE_LATEST``."""
        return generate_latest(self.registry)
