"""The soak, 60 s per store: 300 concurrent short streams against a real
``tokenwire serve`` process, each replaced as it ends; its RSS and open file descriptors stay flat after
warm-up, and every stream ends with ``done``.

The driver and the flatness criterion are ``bench/soak.py``'s, which ``make bench`` runs for 10 minutes
per store.  ``-s`` shows the figures of each run.  The criterion itself is checked first, on made-up
samples: it must pass noise and a warm-up, and fail a leak.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bench.soak import CONCURRENCY, Sample, judge, run_soak
from redis_server import redis_url_fixture

redis_url = redis_url_fixture()

DURATION_S = 60.0
MIB = 1024


def samples(rss_mib: Callable[[int], float], fds: Callable[[int], int]) -> list[Sample]:
    """One sample a second for DURATION_S, from functions of the second."""
    return [Sample(t, int(rss_mib(t) * MIB), fds(t), t * 200) for t in range(int(DURATION_S) + 1)]


def warming(t: int) -> float:
    """40 MiB idle, 55 MiB after a 10 s climb; +-1 MiB of noise."""
    return 40 + 15 * min(t, 10) / 10 + (t * 7919 % 3) - 1


def sockets(t: int) -> int:
    """300 connections + 14, less up to 30 being replaced."""
    return 314 - (t * 7919 % 31) if t >= 2 else 14 + 150 * t


def test_flat_passes_warm_up_and_noise() -> None:
    verdict = judge(samples(warming, sockets), DURATION_S)
    assert verdict.flat, verdict.reasons


def test_flat_passes_a_step_that_stays() -> None:
    # RSS is a high-water mark: a busier spell raises it by a few MiB for good.
    verdict = judge(samples(lambda t: warming(t) + (3 if t > 35 else 0), sockets), DURATION_S)
    assert verdict.flat, verdict.reasons


def test_rss_that_keeps_growing_is_not_flat() -> None:
    # 0.25 MiB/s: ~1 KiB per stream at 250 streams/s.
    verdict = judge(samples(lambda t: warming(t) + 0.25 * t, sockets), DURATION_S)
    assert not verdict.flat
    assert verdict.reasons[0].startswith("RSS grows")


def test_fds_that_climb_are_not_flat() -> None:
    # One fd kept per 500 streams, at 250 streams/s.
    verdict = judge(samples(warming, lambda t: sockets(t) + t // 2), DURATION_S)
    assert not verdict.flat
    assert any(reason.startswith("fds") for reason in verdict.reasons)


def test_too_short_a_run_is_not_judged_flat() -> None:
    verdict = judge(samples(warming, sockets)[:12], DURATION_S)
    assert not verdict.flat


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "redis"])
def test_rss_and_fds_stay_flat_under_churn(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # Only the Redis run asks for redis-server (missing: skipped, or failed in CI).
    url = request.getfixturevalue("redis_url") if store == "redis" else "memory"
    result = run_soak(url, DURATION_S, CONCURRENCY, log_dir=tmp_path, log=print)
    assert result.errors == 0, f"{dict(result.failures)}: {result.examples}"
    assert result.no_terminal == 0
    # Churn happened: every stream was replaced several times.  A floor, not a speed goal (~0.4 s a stream
    # unloaded; with Redis ~7 s at 300 streams today): the bench reports streams/s.
    assert result.completed >= CONCURRENCY * 3, result.summary()
    flat = result.flat  # (the assertion shows the summary, not the samples)
    assert flat, result.summary()
