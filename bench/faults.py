"""Faults: lost cancels, a dead replica's streams, a Redis restart, measured.

The scenarios are those of ``tests/test_redis_promises.py``, from ``tests/fault_scenarios.py`` (one
implementation): ``tokenwire serve`` processes on loopback, a real ``redis-server``, and the tests' fake
OpenAI upstream in this process.  Recorded: cancels lost out of N per store and cancel path; time from a
replica's SIGKILL to the terminal event on a resume through another replica (p50 / max over 50 streams);
how 50 live streams ended across a Redis restart, by SHUTDOWN NOSAVE and by SIGKILL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from redis_server import RedisServer, find_redis_server  # noqa: E402
from fault_scenarios import CANCEL_PATHS, cancel_streams, kill_and_resume, restart_redis_mid_stream  # noqa: E402
from replicas import (  # noqa: E402
    CANCEL_AFTER_TOKENS,
    CANCEL_BEFORE_FIRST_TOKEN,
    CANCEL_BOUND,
    PROFILES,
    REPLICA_LOST_BOUND,
    ProfiledUpstream,
    run_replicas,
)

EXAMPLES = 10  # problems kept in results.json per scenario, to read with the numbers


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench(
    log_dir: Path, log: Callable[[str], None], *, cancels: int = 500, streams: int = 50
) -> dict[str, Any]:
    """Run every scenario once; the numbers for results.json (``faults``)."""
    try:
        executable = find_redis_server()
    except FileNotFoundError as exc:
        return {"error": str(exc)}
    # ``python -m bench`` pins itself to the harness CPU; replicas (children of this thread) may use all.
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):
        pass
    log_dir = log_dir / "faults"
    log_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "cancels": cancels,
        "streams": streams,
        "cancel_bound_s": CANCEL_BOUND,
        "cancel_after_tokens": CANCEL_AFTER_TOKENS,
        "cancel_before_first_token_s": CANCEL_BEFORE_FIRST_TOKEN,
        "token_interval_ms": PROFILES["fast"]["interval"] * 1000,
        "first_token_delay_s": PROFILES["slowfirst"]["first_token_delay"],
        "replica_lost_bound_s": REPLICA_LOST_BOUND,
        "cancel": {},
    }
    with ProfiledUpstream() as upstream:
        with RedisServer(executable) as redis:
            for store in ("memory", "redis"):
                url = "memory" if store == "memory" else redis.url
                names = ("M",) if store == "memory" else ("A", "B")
                with run_replicas(upstream.url, url, names, log_dir=log_dir) as replicas:
                    for path in CANCEL_PATHS[store]:
                        report = cancel_streams(upstream, replicas, path, streams=cancels)
                        log(f"faults: {report.summary()}")
                        out["cancel"].setdefault(store, {})[path] = {
                            "n": report.streams,
                            "lost": report.lost,
                            "no_terminal": report.no_terminal,
                            "not_cancelled": report.not_cancelled,
                            "before_first_token": report.before_first_token,
                            "mid_stream": report.mid_stream,
                            "finished_first": report.finished_first,
                            "close_p50_ms": _percentile(report.close_ms, 0.5),
                            "close_max_ms": max(report.close_ms, default=None),
                            "elapsed_s": report.elapsed_s,
                            "problems": report.problems[:EXAMPLES],
                        }
                upstream.reset()

            with run_replicas(upstream.url, redis.url, ("runner", "survivor"), log_dir=log_dir) as pair:
                killed = kill_and_resume(upstream, *pair, streams=streams)
            log(f"faults: {killed.summary()}")
            out["replica_death"] = {
                "n": streams,
                "got_terminal": len(killed.delays),
                "p50_s": _percentile(killed.delays, 0.5),
                "max_s": max(killed.delays, default=None),
                "terminals": dict(killed.terminals),
                "problems": killed.problems[:EXAMPLES],
            }
            upstream.reset()

        out["redis_restart"] = {}
        for how in ("shutdown", "kill"):  # each on a Redis of its own
            with (
                RedisServer(executable) as redis,
                run_replicas(upstream.url, redis.url, log_dir=log_dir) as replicas,
            ):
                restarted = restart_redis_mid_stream(upstream, redis, replicas, how=how, streams=streams)
            log(f"faults: {restarted.summary()}")
            out["redis_restart"][how] = {
                "n": streams,
                "completed": restarted.completed,
                "typed": dict(restarted.typed),
                "cut": restarted.cut,
                "recovery_s": restarted.recovery_s,
                "outage_answers": {
                    k: (v.get("status"), round(v["s"], 3)) for k, v in restarted.outage.items()
                },
                "problems": restarted.problems[:EXAMPLES],
            }
            upstream.reset()
    return out
