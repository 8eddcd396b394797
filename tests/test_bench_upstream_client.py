"""The upstream_client benchmark's contenders do the same work: each relays the fake upstream whole.

bench/upstream_client.py runs the openai provider on tokenwire's own HTTP client, on httpx and on
aiohttp (through an adapter of the bench's own).  A comparison of their CPU per token means nothing
if one of them drops tokens, reads past the end or leaves a stopped stream's socket open: here each
reads the bench's fake upstream to its end twice (the second time on a pooled connection), and
closes the socket of a stream closed half-way.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

# aiohttp is in the `test` extra, for this test of the bench's aiohttp adapter.
from bench.upstream import FakeUpstream
from bench.upstream_client import TRANSPORTS, create_provider
from tokenwire import GenerationRequest
from tokenwire._events import Finish, Token


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_each_contender_relays_the_fake_upstream_whole_and_closes_a_stopped_stream(transport: str) -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        await upstream.start()
        provider = create_provider(transport, upstream.base_url)
        try:
            for rid in ("a1", "a2"):
                request = GenerationRequest.from_prompt(f"bench id={rid} n=20 rate=1000")
                events = [e async for e in provider.stream(request)]
                texts = [e.text for e in events if isinstance(e, Token)]
                assert len(texts) == 20 and all(t.startswith("@") and len(t) == 21 for t in texts), texts
                assert isinstance(events[-1], Finish) and events[-1].usage is not None
                assert events[-1].usage.completion_tokens == 20
                assert upstream.records[rid].finished_ns and not upstream.records[rid].closed_ns

            request = GenerationRequest.from_prompt("bench id=b1 n=1000 rate=100")
            async with contextlib.aclosing(provider.stream(request)) as stream:
                async for event in stream:
                    if isinstance(event, Token):
                        break  # closes the stream: its socket must close
            record = await asyncio.wait_for(upstream.wait_closed("b1"), 2)
            assert record.closed_ns and not record.finished_ns
        finally:
            await provider.aclose()
            await upstream.aclose()

    asyncio.run(scenario())
