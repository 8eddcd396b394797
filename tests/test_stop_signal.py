"""Each HTTP provider's stop hook: a generation's StopSignal closes the upstream socket by itself.

The relay stops a generation by firing its StopSignal (see providers.base) as well as by
cancelling its task, because library code may swallow the cancellation.  Here nobody
cancels anything: the consumer task runs under a signal, the test fires the signal while
the provider waits for the next token, and the upstream must see its socket closed and
the stream end, within a second.  (The local model's hook is tested in
test_local_provider.py, the relay's use of both in test_stop.py.)
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Iterator
from contextlib import suppress

import httpx
import pytest

from fake_anthropic import FakeAnthropicUpstream
from fakes import FakeOpenAIUpstream
from tokenwire import GenerationRequest, ProviderError, Token
from tokenwire.providers._http import HTTPProvider
from tokenwire.providers.anthropic import AnthropicProvider
from tokenwire.providers.base import StopSignal, current_stop
from tokenwire.providers.openai import OpenAIProvider

BOUND = 1.0  # seconds from the stop to the upstream seeing its socket closed


@pytest.fixture(params=["openai", "anthropic", "openai-httpx"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def fake(kind: str) -> Iterator[FakeOpenAIUpstream]:
    fake_class = FakeAnthropicUpstream if kind == "anthropic" else FakeOpenAIUpstream
    with fake_class() as upstream:
        # Three tokens, then silence: the provider is waiting on the socket when the stop comes.
        upstream.configure(tokens=[f" t{i}" for i in range(100)], hold_after=3)
        yield upstream
        upstream.release()


def provider_for(kind: str, fake: FakeOpenAIUpstream) -> tuple[HTTPProvider, httpx.AsyncClient | None]:
    if kind == "anthropic":
        return AnthropicProvider(fake.url), None
    if kind == "openai-httpx":
        client = httpx.AsyncClient()  # a caller's own client: the requests go through httpx
        return OpenAIProvider(fake.url + "/v1", client=client), client
    return OpenAIProvider(fake.url + "/v1"), None


def test_the_stop_signal_closes_the_upstream_without_a_cancellation(kind: str, fake: FakeOpenAIUpstream) -> None:
    async def main() -> list[object]:
        provider, client = provider_for(kind, fake)
        await provider.startup()
        signal = StopSignal()
        context = contextvars.copy_context()
        context.run(current_stop.set, signal)
        three = asyncio.Event()
        events: list[object] = []

        async def consume() -> None:
            with suppress(ProviderError):  # what the aborted socket does to the stream, if anything
                async for event in provider.stream(GenerationRequest.from_prompt("hi")):
                    events.append(event)
                    if sum(isinstance(e, Token) for e in events) == 3:
                        three.set()

        task = asyncio.create_task(consume(), context=context)
        try:
            async with asyncio.timeout(5):
                await three.wait()
            await asyncio.to_thread(fake.wait_request)
            signal.stop("the test stops it")
            async with asyncio.timeout(BOUND):  # nobody cancels the task: the stream ends by itself
                await task
        finally:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
            await provider.aclose()
            if client is not None:
                await client.aclose()
        return events

    events = asyncio.run(main())
    assert [e.text for e in events if isinstance(e, Token)] == [" t0", " t1", " t2"]
    assert fake.wait_closed(BOUND) is not None, "the upstream socket stayed open after the stop"
