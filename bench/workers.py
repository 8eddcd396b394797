"""``tokenwire serve --workers N``: the relay's ceiling with one worker and with two, on this 2-core box.

Both run with the Redis store (more than one worker needs it), nothing pinned: the workers, the
fake upstream and the load generator share both cores, which is what limits two workers here.  The
ceiling search is the ceiling section's (200 streams, faster and faster, until p99 >= 10 ms).
``redis-server``'s own CPU per token is measured too: on a box with cores to spare, the workers
scale until Redis's one core is busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from pathlib import Path
from typing import Any

import redis

from . import relay, servers
from .loadgen import Target, run_streams
from .upstream import FakeUpstream

COUNTS = (1, 2)


def _redis_pid(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


async def bench(
    upstream: FakeUpstream, plan: Any, log_dir: Path, cpus: tuple[set[int] | None, set[int] | None], log: Any
) -> dict[str, Any]:
    server_cpus, harness_cpus = cpus
    everywhere = os.sched_getaffinity(0) | (server_cpus or set()) | (harness_cpus or set())
    out: dict[str, Any] = {"cpus": len(everywhere), "targets": {}}
    with servers.redis_store() as url:
        redis_pid = _redis_pid(url)
        group = {
            f"{n} worker{'s' if n > 1 else ''}": servers.tokenwire(
                upstream.base_url, name=f"tokenwire-{n}-workers", store=url, workers=n
            )
            for n in COUNTS
        }
        for server in group.values():
            await asyncio.to_thread(server.start, cpus=None, log_dir=log_dir)
        os.sched_setaffinity(0, everywhere)
        try:
            targets = [Target(name, server.port) for name, server in group.items()]
            pids = {name: server.pid for name, server in group.items()}
            ceiling_plan = dataclasses.replace(plan, ceiling_floor=False)
            found = await relay.ceiling(upstream, targets, pids, ceiling_plan, log)
            out["streams"] = found["streams"]
            out["targets"] = found["targets"]
            # Redis's own CPU per token, at the latency section's 500 streams x 20 tokens/s through one worker.
            load = await run_streams(
                targets[0], 500, plan.rate, ramp_s=plan.ramp_s, settle_s=plan.settle_s, measure_s=plan.measure_s,
                start_timeout_s=plan.start_timeout_s, server_pid=redis_pid,
            )  # fmt: skip
            out["redis_cpu"] = load.server_cpu
            out["redis_us_per_token"] = load.server_cpu / load.window_tokens_per_s * 1e6 if load.window_tokens_per_s else None
            log(f"workers: redis-server used {load.server_cpu:.0%} of a core at {load.window_tokens_per_s:.0f} tok/s")
        finally:
            os.sched_setaffinity(0, harness_cpus or everywhere)
            for server in group.values():
                server.stop()
    return out
