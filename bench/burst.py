"""Bursts: N streams started at once, while other streams are already running.

The latency section starts its streams evenly over a second and opens its window once every stream
has had its first token: the relay's steady state.  A deployment also meets the moment when
hundreds of requests arrive together (a page that many users load at once, a retry storm after a
blip).  Here, per round and per target:

1. ``BACKGROUND`` streams of 20 tokens/s start over a second and run;
2. once they all have had a first token and a second has passed, ``N`` streams start at once (their
   connections opened together, each request written as its connection is made);
3. the burst's *time to first token* is, per stream, from the request's write to the first token's
   arrival; the *background latency* is that of the tokens the upstream wrote for the background
   streams in the ``WINDOW_S`` seconds from the burst's start (the same latency as the latency
   section's: arrival minus the upstream's write time).

Targets: the loopback floor (the same load generator straight at the fake upstream) and tokenwire.
Each runs *unpinned* (nothing pinned: relay, upstream and load generator share every core, as on a
box where one deploys it) and *pinned* (the relay on one CPU, the harness on the other, as the
latency section); rounds interleave the targets.
"""

from __future__ import annotations

import asyncio
import os
from array import array
from pathlib import Path
from time import monotonic_ns
from typing import Any

from . import servers
from .loadgen import Sink, StreamClient, Target, _ids, open_stream, percentile, prompt_for
from .upstream import FakeUpstream

LEVELS = (200, 500)
BACKGROUND = 100  # streams already running when the burst arrives
RATE = 20.0  # tokens/s of every stream
BURST_TOKENS = 40  # each burst stream: 2 s of tokens, then it ends
WINDOW_S = 4.0  # background latency counted over this long from the burst's start
FIRST_TOKEN_TIMEOUT_S = 20.0
MODES = ("unpinned", "pinned")



async def _first_tokens(clients: list[StreamClient], timeout: float) -> int:
    """Wait until every client has its first token (or ended, or the timeout); how many never got one."""
    pending = [c.first_token for c in clients if not c.first_token.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    return sum(1 for c in clients if not c.first_token_ns)


async def burst_once(target: Target, streams: int) -> dict[str, Any]:
    """One round: background streams, then ``streams`` started at once; the figures of both."""
    tag = f"b{next(_ids)}"  # the load generator's run counter: prompts unique across sections
    never = 2**63 - 1
    background_sink = Sink(never, never)
    background_tokens = int(RATE * 60)  # a minute's worth: none runs out before the window ends

    async def background(i: int) -> StreamClient:
        await asyncio.sleep(i / BACKGROUND)
        return await open_stream(target, prompt_for(f"{tag}g{i}", background_tokens, RATE), background_sink)

    running = await asyncio.gather(*(background(i) for i in range(BACKGROUND)))
    late_background = await _first_tokens(running, FIRST_TOKEN_TIMEOUT_S)
    await asyncio.sleep(1.0)

    start = monotonic_ns()
    background_sink.start, background_sink.end = start, start + int(WINDOW_S * 1e9)
    burst_sink = Sink(0, 0)  # the burst's own token latencies are not what is measured here
    prompts = [prompt_for(f"{tag}s{i}", BURST_TOKENS, RATE) for i in range(streams)]
    burst = await asyncio.gather(*(open_stream(target, prompt, burst_sink) for prompt in prompts))
    no_first_token = await _first_tokens(burst, FIRST_TOKEN_TIMEOUT_S)
    left = background_sink.end - monotonic_ns()
    if left > 0:
        await asyncio.sleep(left / 1e9)
    # Every background token of the window has been written; give the late ones a moment to arrive.
    await asyncio.sleep(0.5)
    for client in (*running, *burst):
        client.abort()
    await asyncio.gather(*(c.done for c in (*running, *burst)))
    ttft = array("q", (c.first_token_ns - c.sent_ns for c in burst if c.first_token_ns))
    failed = [c.error for c in burst if c.error and not c.complete and not c.abort_ns]
    return {
        "ttft_ns": ttft,
        "background_ns": background_sink.latencies,
        "no_first_token": no_first_token,
        "late_background": late_background,
        "failed": len(failed),
        "errors": failed[:3],
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttft = sorted(x for r in runs for x in r["ttft_ns"])
    background = sorted(x for r in runs for x in r["background_ns"])
    return {
        "ttft_p50_ms": percentile(ttft, 50, presorted=True) / 1e6,
        "ttft_p99_ms": percentile(ttft, 99, presorted=True) / 1e6,
        "ttft_max_ms": (ttft[-1] / 1e6) if ttft else float("nan"),
        "background_p50_ms": percentile(background, 50, presorted=True) / 1e6,
        "background_p99_ms": percentile(background, 99, presorted=True) / 1e6,
        "background_tokens": len(background),
        "no_first_token": sum(r["no_first_token"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "errors": [e for r in runs for e in r["errors"]][:3],
    }


async def bench(
    upstream: FakeUpstream,
    rounds: int,
    log_dir: Path,
    cpus: tuple[set[int] | None, set[int] | None],
    log: Any,
) -> dict[str, Any]:
    """Per mode, per level: ``rounds`` rounds of the floor and tokenwire in turn."""
    server_cpus, harness_cpus = cpus
    everywhere = os.sched_getaffinity(0) | (server_cpus or set()) | (harness_cpus or set())
    floor = Target("loopback", upstream.port, "/v1/chat/completions", openai=True)
    out: dict[str, Any] = {"rounds": rounds, "background": BACKGROUND, "window_s": WINDOW_S, "modes": {}}
    for mode in MODES:
        pinned = mode == "pinned" and server_cpus is not None
        server = servers.tokenwire(upstream.base_url)
        await asyncio.to_thread(server.start, cpus=server_cpus if pinned else None, log_dir=log_dir)
        os.sched_setaffinity(0, harness_cpus if pinned and harness_cpus else everywhere)
        try:
            targets = [floor, Target("tokenwire", server.port)]
            levels: dict[str, Any] = {}
            for level in LEVELS:
                runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
                for rep in range(rounds):
                    for target in targets:
                        run = await burst_once(target, level)
                        runs[target.name].append(run)
                        one = summarize([run])
                        log(
                            f"burst {mode:<8} {level:>3} at once  {target.name:<9} rep {rep + 1}: ttft p50 "
                            f"{one['ttft_p50_ms']:.1f} ms  p99 {one['ttft_p99_ms']:.1f} ms  background p99 "
                            f"{one['background_p99_ms']:.2f} ms"
                            + (f"  no first token {one['no_first_token']}" if one["no_first_token"] else "")
                            + (f"  FAILED {one['failed']}: {one['errors'][:1]}" if one["failed"] else "")
                        )
                        upstream.forget()
                        await asyncio.sleep(0.5)
                levels[str(level)] = {name: summarize(r) for name, r in runs.items()}
            out["modes"][mode] = levels
        finally:
            os.sched_setaffinity(0, harness_cpus or everywhere)
            server.stop()
    return out
