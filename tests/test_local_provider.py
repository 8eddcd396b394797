"""LocalProvider against the real bundled model (SmolLM2-135M-Instruct via llama-cpp-python).

Every cancellation test checks the worker's own counters (``provider.stats``):
what matters is that the model stopped computing, not that the consumer
stopped reading.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress

import pytest

from tokenwire import ConfigError, Finish, GenerationRequest, ProviderError, Queued, Token
from tokenwire.providers.base import StopSignal, current_stop
from tokenwire.providers.local import (
    SWITCH_INTERVAL,
    LocalProvider,
    LocalStats,
    _SwitchInterval,
    bundled_model_path,
    model_name,
)

QUESTION = "What is 2+2?"
STORY = "Write a long story about a dragon who learns to cook."
# ~1500 tokens: several seconds of prompt processing on 2 cores.
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 150 + "\nHow many foxes were there?"
MEDIUM_PROMPT = "The quick brown fox jumps over the lazy dog. " * 52 + "\nHow many foxes were there?"
TOO_LONG_PROMPT = LONG_PROMPT * 2  # ~3000 tokens > n_ctx 2048


def ask(prompt: str, **options: object) -> GenerationRequest:
    return GenerationRequest.from_prompt(prompt, temperature=0.0, seed=1, **options)  # type: ignore[arg-type]


async def collect(events: AsyncIterator[object]) -> list[object]:
    return [event async for event in events]


def text_of(events: list[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


@pytest.fixture(scope="module")
def provider() -> Iterator[LocalProvider]:
    local = LocalProvider()
    asyncio.run(local.startup())
    yield local
    asyncio.run(local.aclose())


def wait_idle(provider: LocalProvider) -> LocalStats:
    assert provider.wait_until(lambda s: not s.busy and s.queued == 0, timeout=30), "the worker never became idle"
    return provider.stats


def test_names_and_bundled_model() -> None:
    assert bundled_model_path().endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert model_name(bundled_model_path()) == "SmolLM2-135M-Instruct"
    assert model_name("/m/Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Llama-3.2-1B-Instruct"
    assert model_name("/m/phi-2.gguf") == "phi-2"


def test_missing_model_file_says_how_to_fix() -> None:
    with pytest.raises(ConfigError, match="--model-path"):
        LocalProvider("/nonexistent/model.gguf")


def test_stream_before_startup_is_a_clear_error() -> None:
    async def main() -> None:
        with pytest.raises(ProviderError, match="startup"):
            await collect(LocalProvider().stream(ask(QUESTION)))

    asyncio.run(main())


def test_generates_tokens_then_finish_with_usage(provider: LocalProvider) -> None:
    assert provider.name == "local"
    assert provider.default_model == "SmolLM2-135M-Instruct"
    events = asyncio.run(collect(provider.stream(ask(QUESTION, max_tokens=64))))

    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) >= 3
    assert all(t.text for t in tokens)
    assert "4" in text_of(events)
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "stop"
    assert finish.usage is not None
    # Same numbers as llama-cpp-python's own non-streaming usage for this request.
    assert finish.usage.prompt_tokens == 37
    assert finish.usage.completion_tokens == len(tokens)
    assert not any(isinstance(e, Queued) for e in events)  # the worker was idle


def test_max_tokens_finishes_with_length(provider: LocalProvider) -> None:
    events = asyncio.run(collect(provider.stream(ask(STORY, max_tokens=5))))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "length"
    assert finish.usage is not None and finish.usage.completion_tokens == 5


@pytest.mark.parametrize("how", ["aclose", "cancel-task", "stop-signal"])
def test_cancel_mid_generation_stops_within_one_token(provider: LocalProvider, how: str) -> None:
    """``stop-signal``: the relay's level-triggered stop alone, no cancellation delivered to the task."""
    before = wait_idle(provider)

    async def main() -> int:
        five_tokens = asyncio.Event()
        signal = StopSignal()
        context = contextvars.copy_context()
        context.run(current_stop.set, signal)

        async def consume(events: AsyncIterator[object]) -> None:
            received = 0
            async for event in events:
                received += isinstance(event, Token)
                if received == 5:
                    five_tokens.set()
                    if how == "aclose":
                        return

        events = provider.stream(ask(STORY, max_tokens=500))
        task = asyncio.create_task(consume(events), context=context)
        await five_tokens.wait()
        if how == "aclose":
            await task
            await events.aclose()  # type: ignore[attr-defined]
        elif how == "stop-signal":
            signal.stop("the test stops it")
            async with asyncio.timeout(2):  # the stream ends by itself: nobody cancels the task
                await task
        else:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        return provider.stats.generated_tokens  # the stop flag is set by now

    at_cancel = asyncio.run(main())
    after = wait_idle(provider)
    assert after.generated_tokens - at_cancel <= 1, "the model kept generating after the stop"
    assert after.generated_tokens - before.generated_tokens < 50
    assert after.cancelled_jobs == before.cancelled_jobs + 1
    assert after.finished_jobs == before.finished_jobs


def test_cancel_while_queued(provider: LocalProvider) -> None:
    before = wait_idle(provider)

    async def main() -> list[object]:
        running = provider.stream(ask(STORY, max_tokens=500))
        assert isinstance(await anext(running), Token)  # the worker is busy with it now
        second = provider.stream(ask(QUESTION, max_tokens=5))
        third = provider.stream(ask(QUESTION, max_tokens=5))
        assert await anext(second) == Queued(1)
        assert await anext(third) == Queued(2)

        await second.aclose()  # type: ignore[attr-defined]
        assert provider.stats.queued == 1
        assert await anext(third) == Queued(1)

        await running.aclose()  # type: ignore[attr-defined]
        return await collect(third)

    rest = asyncio.run(main())
    finish = rest[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "length"
    after = wait_idle(provider)
    assert after.started_jobs == before.started_jobs + 2, "the job cancelled while queued must never start"
    assert after.cancelled_jobs == before.cancelled_jobs + 2
    assert after.finished_jobs == before.finished_jobs + 1


def test_cancel_during_prompt_processing_and_model_still_works(provider: LocalProvider) -> None:
    reference = text_of(asyncio.run(collect(provider.stream(ask(QUESTION, max_tokens=20)))))
    before = wait_idle(provider)

    async def main() -> float:
        task = asyncio.create_task(collect(provider.stream(ask(LONG_PROMPT, max_tokens=5))))
        started = await asyncio.to_thread(provider.wait_until, lambda s: s.started_jobs > before.started_jobs, 30)
        assert started
        # The scenario, not synchronisation: cancel a little way into the several
        # seconds of prompt processing; the stats below prove where it stopped.
        await asyncio.sleep(0.3)
        cancelled_at = time.perf_counter()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(provider.wait_until, lambda s: not s.busy, 30)
        return time.perf_counter() - cancelled_at

    elapsed = asyncio.run(main())
    after = provider.stats
    assert after.generated_tokens == before.generated_tokens, "the prompt finished: make LONG_PROMPT longer"
    assert after.aborted_decodes == before.aborted_decodes + 1
    assert after.cancelled_jobs == before.cancelled_jobs + 1
    assert elapsed < 1.0, f"the worker took {elapsed:.2f}s to stop after the cancel"

    # The model is still sound: the same answer as before the abort, and a prompt
    # longer than one batch (512 tokens, the one the abort cut short) still works.
    assert text_of(asyncio.run(collect(provider.stream(ask(QUESTION, max_tokens=20))))) == reference
    events = asyncio.run(collect(provider.stream(ask(MEDIUM_PROMPT, max_tokens=2))))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.finish_reason == "length"
    assert finish.usage is not None and finish.usage.prompt_tokens is not None
    assert finish.usage.prompt_tokens > 512


def test_prompt_longer_than_context_is_a_provider_error(provider: LocalProvider) -> None:
    before = wait_idle(provider)
    with pytest.raises(ProviderError) as caught:
        asyncio.run(collect(provider.stream(ask(TOO_LONG_PROMPT, max_tokens=5))))
    assert caught.value.error_type == "upstream_error"
    assert not caught.value.retryable
    assert "too long" in caught.value.message and "n_ctx" in caught.value.message
    assert provider.stats.failed_jobs == before.failed_jobs + 1
    events = asyncio.run(collect(provider.stream(ask(QUESTION, max_tokens=3))))
    assert isinstance(events[-1], Finish)


def test_full_queue_and_aclose_leave_no_thread() -> None:
    threads_before = set(threading.enumerate())

    async def main() -> None:
        local = LocalProvider(max_queue=1)
        await local.startup()
        assert len(set(threading.enumerate()) - threads_before) == 1  # one worker, nothing else
        running = local.stream(ask(STORY, max_tokens=500))
        assert isinstance(await anext(running), Token)
        waiting = local.stream(ask(QUESTION))
        assert await anext(waiting) == Queued(1)
        with pytest.raises(ProviderError) as full:
            await anext(local.stream(ask(QUESTION)))
        assert full.value.retryable and "waiting" in full.value.message

        await local.aclose()  # with a job running and one queued: both hear why
        for events in (running, waiting):
            with pytest.raises(ProviderError, match="shutting down") as closed:
                await collect(events)
            assert closed.value.retryable
        stats = local.stats
        assert not stats.busy and stats.queued == 0
        await local.aclose()  # idempotent

    asyncio.run(main())
    assert set(threading.enumerate()) == threads_before


@pytest.mark.parametrize("libc", [True, False], ids=["strlen", "python-fallback"])
def test_the_abort_switch_reads_its_byte(monkeypatch: pytest.MonkeyPatch, libc: bool) -> None:
    import ctypes

    import llama_cpp

    from tokenwire.providers.local import _AbortSwitch

    if not libc:
        def no_libc(*args: object, **kwargs: object) -> None:
            raise OSError("no libc here")

        monkeypatch.setattr(ctypes, "CDLL", no_libc)
    switch = _AbortSwitch(llama_cpp)
    # Called as ggml calls it: through the C function pointer, with the data pointer.
    assert switch.callback(switch.data) is False
    switch.set()
    assert switch.callback(switch.data) is True
    switch.clear()
    assert switch.callback(switch.data) is False


def _thread_ids() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def _policies(tids: set[int]) -> list[int]:
    policies = []
    for tid in tids:
        with suppress(OSError):  # a thread that ended meanwhile
            policies.append(os.sched_getscheduler(tid))
    return policies


@pytest.mark.parametrize("idle_priority", [True, False], ids=["idle", "normal"])
def test_the_model_yields_the_cpu_and_the_gil_to_the_event_loop(idle_priority: bool) -> None:
    default_interval = sys.getswitchinterval()  # lowered already if the module's provider runs

    async def main() -> tuple[float, list[int]]:
        before = _thread_ids()
        local = LocalProvider(idle_priority=idle_priority)
        await local.startup()
        try:
            interval = sys.getswitchinterval()
            # The worker thread, and the OpenMP threads llama.cpp starts from it on the first decode.
            await collect(local.stream(ask(QUESTION, max_tokens=2)))
            started = _thread_ids() - before
            return interval, _policies(started)
        finally:
            await local.aclose()

    interval, policies = asyncio.run(main())
    assert interval <= SWITCH_INTERVAL
    assert sys.getswitchinterval() == default_interval, "as it was before: restored by aclose()"
    expected = os.SCHED_IDLE if idle_priority else os.SCHED_OTHER
    assert len(policies) >= min(2, os.cpu_count() or 1), "the worker and llama.cpp's compute threads"
    assert all(policy == expected for policy in policies), policies


def test_the_switch_interval_is_lowered_while_any_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    interval = [0.005]
    monkeypatch.setattr(sys, "getswitchinterval", lambda: interval[0])
    monkeypatch.setattr(sys, "setswitchinterval", lambda value: interval.__setitem__(0, value))
    models = _SwitchInterval()
    models.lower()
    models.lower()  # a second model
    assert interval[0] == SWITCH_INTERVAL
    models.restore()
    assert interval[0] == SWITCH_INTERVAL, "one model still runs"
    models.restore()
    assert interval[0] == 0.005
