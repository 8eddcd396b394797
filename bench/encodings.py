"""What another API's wire format costs: one tokenwire server, the same plain-text streams read as
tokenwire's own events (``/api/stream``), as OpenAI's chunks (``/v1/chat/completions``) and as the AI
SDK's UI message chunks (``/api/chat``), measured in turns in each round (``bench.relay.latency``).

The two foreign formats are written from the log's events (``tokenwire._response.WireFormat``), which
costs a JSON parse and a JSON encoding per event; the goal is at most 10% more CPU per token.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from . import relay, servers
from .loadgen import Target
from .upstream import FakeUpstream

LEVELS = (200, 500)
#: Target names, and the route and format each reads.
FORMATS = {
    "/api/stream": {},
    "/v1/chat/completions": {"openai": True},
    "/api/chat": {"ai_sdk": True},
}


async def bench(upstream: FakeUpstream, plan: Any, log_dir: Path, server_cpus: set[int] | None, log: Any) -> dict[str, Any]:
    server = servers.tokenwire(upstream.base_url)
    await asyncio.to_thread(server.start, cpus=server_cpus, log_dir=log_dir)
    try:
        targets = [Target(path, server.port, path=path, **options) for path, options in FORMATS.items()]  # type: ignore[arg-type]
        latency_plan = dataclasses.replace(plan, levels=LEVELS, repeats=plan.cpu_rounds)
        out = await relay.latency(upstream, targets, {t.name: server.pid for t in targets}, latency_plan, log)
    finally:
        server.stop()
    return {"repeats": plan.cpu_rounds, "levels": out["levels"]}
