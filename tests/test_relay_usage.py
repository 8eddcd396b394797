"""The relay's own bookkeeping, without HTTP: usage on every terminal event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fakes import run_async
from tokenwire import GenerationRequest, Provider, Relay, RelayOptions, Token, Usage, UsageUpdate
from tokenwire._events import ProviderEvent


class Billing(Provider):
    """Two tokens, a running usage that counts more (multi-token deltas), then silence."""

    name = default_model = "billing"

    def __init__(self) -> None:
        self.reached_silence = asyncio.Event()

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        yield UsageUpdate(Usage(0, prompt_tokens=12))
        yield Token("Hello there")
        yield Token(", friend")
        yield UsageUpdate(Usage(5, prompt_tokens=12))
        self.reached_silence.set()
        await asyncio.Event().wait()  # until cancelled
        yield Token("never")


def last_event(relay: Relay, stream_id: str) -> bytes:
    return relay.store.read_nowait(stream_id, 0).entries[-1]  # type: ignore[attr-defined]


def test_a_cancelled_stream_bills_the_providers_running_usage() -> None:
    async def main() -> bytes:
        provider = Billing()
        async with Relay(provider) as relay:
            meta, _ = await relay.start(GenerationRequest.from_prompt("hi"))
            task = relay._running[meta.stream_id].task
            assert task is not None
            await provider.reached_silence.wait()
            await relay.cancel(meta.stream_id)
            await task
            return last_event(relay, meta.stream_id)

    done = run_async(main)
    assert done.endswith(b'"finish_reason":"cancelled","usage":{"prompt_tokens":12,"completion_tokens":5}}\n\n')


def test_a_deadline_bills_what_was_counted_when_the_provider_reports_nothing() -> None:
    class Counting(Billing):
        async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
            yield Token("a")
            yield Token("b")
            yield Token("c")
            await asyncio.Event().wait()
            yield Token("never")

    async def main() -> bytes:
        async with Relay(Counting(), options=RelayOptions(max_duration=0.2)) as relay:
            meta, _ = await relay.start(GenerationRequest.from_prompt("hi"))
            task = relay._running[meta.stream_id].task
            assert task is not None
            await task
            return last_event(relay, meta.stream_id)

    done = run_async(main)
    assert done.endswith(b'"finish_reason":"timeout","usage":{"prompt_tokens":null,"completion_tokens":3}}\n\n')
