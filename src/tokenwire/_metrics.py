"""Prometheus metrics in the text exposition format, without a dependency.

A handful of counters, gauges and histograms is all a relay needs; the format
is simple (https://prometheus.io/docs/instrumenting/exposition_formats/).
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound:g}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.total:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """What the relay and the responses count; rendered by ``GET /metrics``."""

    def __init__(self, active_streams: Callable[[], int] = lambda: 0) -> None:
        # A gauge read from the relay's own table when rendered: never a second count that can drift.
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

    @property
    def active_streams(self) -> int:
        return self._active_streams()

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(lines)

        def labelled(name: str, label: str, values: dict[str, int]) -> list[str]:
            return [f'{name}{{{label}="{key}"}} {value}' for key, value in sorted(values.items())]

        family("tokenwire_streams_started_total", "counter", "Streams started.",
               [f"tokenwire_streams_started_total {self.streams_started}"])
        family("tokenwire_active_streams", "gauge", "Generations running now.",
               [f"tokenwire_active_streams {self.active_streams}"])
        family("tokenwire_time_to_first_token_seconds", "histogram", "From stream start to the first token.",
               self.time_to_first_token.render("tokenwire_time_to_first_token_seconds"))
        family("tokenwire_inter_token_delay_seconds", "histogram", "Between two tokens from the model.",
               self.inter_token_delay.render("tokenwire_inter_token_delay_seconds"))
        family("tokenwire_cancellations_total", "counter", "Cancelled generations by phase.",
               labelled("tokenwire_cancellations_total", "phase", self.cancellations))
        family("tokenwire_upstream_errors_total", "counter", "Generations ended by an error, by type.",
               labelled("tokenwire_upstream_errors_total", "type", self.upstream_errors))
        family("tokenwire_streams_finished_total", "counter", "Streams ended, by outcome.",
               labelled("tokenwire_streams_finished_total", "outcome", self.finished))
        family("tokenwire_requests_refused_total", "counter", "Requests refused before streaming, by type.",
               labelled("tokenwire_requests_refused_total", "type", self.refused))
        family("tokenwire_bytes_sent_total", "counter", "Event-stream bytes written to clients.",
               [f"tokenwire_bytes_sent_total {self.bytes_sent}"])
        family("tokenwire_clients_dropped_total", "counter", "Clients dropped for not reading.",
               [f"tokenwire_clients_dropped_total {self.clients_dropped}"])
        return "\n".join(out) + "\n"
