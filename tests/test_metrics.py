"""The /metrics exposition, read back with prometheus-client's own parser, as a scraper reads it."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokenwire._metrics import Metrics

LE = ("0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30")
TTFT = "tokenwire_time_to_first_token_seconds"


def scrape(metrics: Metrics) -> dict[str, float]:
    """Every sample, as 'name{label="value",...}' -> value."""
    values = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def test_names_types_and_buckets_are_the_ones_dashboards_scrape() -> None:
    exposition = Metrics().render().decode()
    types = {f.name: f.type for f in text_string_to_metric_families(exposition)}
    # The parser drops a counter's _total from the family name; the samples keep it.
    assert types == {
        "tokenwire_streams_started": "counter",
        "tokenwire_active_streams": "gauge",
        "tokenwire_time_to_first_token_seconds": "histogram",
        "tokenwire_inter_token_delay_seconds": "histogram",
        "tokenwire_cancellations": "counter",
        "tokenwire_upstream_errors": "counter",
        "tokenwire_streams_finished": "counter",
        "tokenwire_requests_refused": "counter",
        "tokenwire_bytes_sent": "counter",
        "tokenwire_clients_dropped": "counter",
    }
    assert "# TYPE tokenwire_streams_started_total counter" in exposition
    values = scrape(Metrics())
    for histogram in (TTFT, "tokenwire_inter_token_delay_seconds"):
        # The le strings, not just their values: le="1" and le="1.0" are two series to Prometheus.
        buckets = [name for name in values if name.startswith(histogram + "_bucket")]
        assert buckets == [f'{histogram}_bucket{{le="{le}"}}' for le in (*LE, "+Inf")]


def test_values_are_read_from_the_counters_when_scraped() -> None:
    running = [3]
    metrics = Metrics(active_streams=lambda: running[0])
    metrics.streams_started = 7
    for value in (0.0005, 0.001, 0.003, 1.0, 31.0):
        metrics.time_to_first_token.observe(value)
    metrics.cancellations["mid_stream"] += 2
    metrics.upstream_errors["upstream_timeout"] += 1
    metrics.finished["stop"] += 5
    metrics.refused["invalid_request"] += 3
    metrics.bytes_sent += 2**40 + 1  # past 32 bits, and still exact as a float
    metrics.clients_dropped += 4

    values = scrape(metrics)
    assert {name: value for name, value in values.items() if "_seconds" not in name} == {
        "tokenwire_streams_started_total": 7,
        "tokenwire_active_streams": 3,
        'tokenwire_cancellations_total{phase="mid_stream"}': 2,
        'tokenwire_upstream_errors_total{type="upstream_timeout"}': 1,
        'tokenwire_streams_finished_total{outcome="stop"}': 5,
        'tokenwire_requests_refused_total{type="invalid_request"}': 3,
        "tokenwire_bytes_sent_total": 2**40 + 1,
        "tokenwire_clients_dropped_total": 4,
    }
    cumulative = [values[f'{TTFT}_bucket{{le="{le}"}}'] for le in (*LE, "+Inf")]
    # A value on a bound counts in that bucket (le is "<="); 31 s is only in +Inf.
    assert cumulative == [2, 2, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5]
    assert values[f"{TTFT}_count"] == 5
    assert values[f"{TTFT}_sum"] == pytest.approx(32.0045)
    assert values['tokenwire_inter_token_delay_seconds_bucket{le="+Inf"}'] == 0

    running[0] = 0
    metrics.streams_started += 1
    again = scrape(metrics)
    assert (again["tokenwire_active_streams"], again["tokenwire_streams_started_total"]) == (0, 8)


def test_each_app_counts_into_its_own_registry() -> None:
    first, second = Metrics(), Metrics()
    first.streams_started += 1
    assert first.registry is not second.registry
    assert scrape(first)["tokenwire_streams_started_total"] == 1
    assert scrape(second)["tokenwire_streams_started_total"] == 0
