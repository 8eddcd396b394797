"""What a token costs on the other ways tokenwire runs: through the Redis store, and mounted in a user's app.

Three servers relay the same plain-text streams from the fake upstream, all pinned to the relay CPU
and loaded at the same time, a third of the streams each (``bench.relay.side_by_side``):

* ``create_app`` with the memory store (``tokenwire serve``): the reference;
* ``create_app`` with the Redis store (``tokenwire serve --store redis://``, a ``redis-server``
  started for the section), as each replica of a scaled-out deployment runs;
* ``mounted``: tokenwire's relay in a user's own FastAPI app (``bench/baselines/mounted.py``, the
  README's example), on plain uvicorn.

The goal is at most 15% more CPU per token than the reference for both.  Redis's own CPU is its
own process's and not counted here.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from . import relay, servers
from .loadgen import Target
from .upstream import FakeUpstream

LEVELS = (200, 500)
REFERENCE = "memory"


async def bench(upstream: FakeUpstream, plan: Any, log_dir: Path, server_cpus: set[int] | None, log: Any) -> dict[str, Any]:
    with servers.redis_store() as redis_url:
        group = {
            REFERENCE: servers.tokenwire(upstream.base_url, name="tokenwire-memory"),
            "redis": servers.tokenwire(upstream.base_url, name="tokenwire-redis", store=redis_url),
            "mounted": servers.baseline("mounted", "bench.baselines.mounted", upstream.base_url),
        }
        for server in group.values():
            await asyncio.to_thread(server.start, cpus=server_cpus, log_dir=log_dir)
        try:
            targets = [
                Target(name, server.port, path="/chat" if name == "mounted" else "/api/stream")
                for name, server in group.items()
            ]
            pids = {name: server.pid for name, server in group.items()}
            levels = await relay.side_by_side(upstream, targets, pids, LEVELS, plan, log, "paths")
        finally:
            for server in group.values():
                server.stop()
    return {"repeats": plan.cpu_rounds, "reference": REFERENCE, "levels": levels}
