"""Prometheus metrics, exposed through prometheus-client's custom-collector interface.

The relay and the responses count into plain attributes (``metrics.bytes_sent += n``)
because that runs once per token: an int add costs a fraction of prometheus-client's
``Counter.inc()``, which takes a lock.  :class:`Metrics` is a collector that turns the
attributes into metric families only when ``/metrics`` is scraped, and each instance has
its own ``CollectorRegistry`` (never the global ``REGISTRY``), so several apps can live
in one process.

With several workers (``tokenwire serve --workers N``), prometheus-client's multiprocess
mode is of no use (it does not see custom collectors).  Each worker publishes its figures
instead, a small JSON file in a directory the workers share (:class:`SharedMetrics`), once
a second and whenever it answers ``/metrics``; the worker that answers adds up every
file: counters and histograms over every worker that ever ran (a worker restarted after
a crash does not take its predecessor's counts away), ``active_streams`` over those alive.
What another worker counted shows up within a second.
"""

from __future__ import annotations

import bisect
import json
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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

    def add(self, other: dict[str, Any]) -> None:
        """Add another histogram's :meth:`snapshot` (same buckets) to this one."""
        self.counts = [a + b for a, b in zip(self.counts, other["counts"])]
        self.total += other["total"]
        self.count += other["count"]

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "total": self.total, "count": self.count}

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

    #: The plain counts, and the counts by label, that :meth:`snapshot` carries.
    COUNTS = ("streams_started", "bytes_sent", "clients_dropped")
    BY_LABEL = ("cancellations", "upstream_errors", "finished", "refused")
    HISTOGRAMS = ("time_to_first_token", "inter_token_delay")

    def snapshot(self) -> dict[str, Any]:
        """Every figure, as JSON-ready data, for another process to add up (:meth:`total`)."""
        return {
            **{name: getattr(self, name) for name in self.COUNTS},
            **{name: dict(getattr(self, name)) for name in self.BY_LABEL},
            **{name: getattr(self, name).snapshot() for name in self.HISTOGRAMS},
            "active_streams": self.active_streams,
        }

    @classmethod
    def total(cls, snapshots: list[dict[str, Any]]) -> Metrics:
        """Metrics whose every figure is the sum of the snapshots' (another process's :meth:`snapshot`)."""
        active = sum(s["active_streams"] for s in snapshots)
        metrics = cls(active_streams=lambda: active)
        for snapshot in snapshots:
            for name in cls.COUNTS:
                setattr(metrics, name, getattr(metrics, name) + snapshot[name])
            for name in cls.BY_LABEL:
                counts = getattr(metrics, name)
                for label, value in snapshot[name].items():
                    counts[label] += value
            for name in cls.HISTOGRAMS:
                getattr(metrics, name).add(snapshot[name])
        return metrics


class SharedMetrics:
    """The figures of every worker of one ``tokenwire serve --workers N``, through files in ``directory``.

    Each worker writes its own :meth:`Metrics.snapshot` to ``<pid>.json`` (:meth:`publish`),
    replacing the file whole, so a reader never sees half of one.  :meth:`render` adds up every
    file, with ``active_streams`` counted only for the workers still alive.
    """

    #: How often each worker publishes its figures, in seconds: how stale another worker's may be.
    INTERVAL = 1.0

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.pid = os.getpid()
        self.path = self.directory / f"{self.pid}.json"

    def publish(self, metrics: Metrics) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(metrics.snapshot()))
        os.replace(partial, self.path)

    def render(self, own: Metrics) -> bytes:
        """``/metrics`` over every worker: this one's figures as they are now, the others' as last published."""
        self.publish(own)
        snapshots = []
        for path in self.directory.glob("*.json"):
            try:
                snapshot = json.loads(path.read_text())
            except (OSError, ValueError):  # removed meanwhile; never half written (os.replace)
                continue
            if not _alive(int(path.stem)):
                snapshot["active_streams"] = 0  # its generations ended with it; its counts stand
            snapshots.append(snapshot)
        return Metrics.total(snapshots).render()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's: not one of ours, but alive
        return True
    return True
