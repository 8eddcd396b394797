"""The provider interface: a model as an async stream of events.

A provider turns one :class:`GenerationRequest` into an async iterator of
``Queued`` / ``Token`` / ``Reasoning`` events that ends with one ``Finish``, or
raises :class:`~tokenwire.ProviderError`.  The relay owns the iteration in a
task of its own; cancelling that task (or ``aclose()`` on the iterator) must stop
the work behind it at once: close the upstream socket, stop the local model.
Nothing here knows about HTTP responses.

A cancellation alone is not enough: it travels as a ``CancelledError`` through
whatever the task awaits, and library code may swallow it (``asyncio.wait_for``
on Python 3.11 does when the inner future completes as the cancel lands,
python/cpython#86296).  So a stop is level-triggered too: the relay runs each
generation under a :class:`StopSignal`, and a provider registers with
:func:`on_stop` what stops its work synchronously (abort the socket, set the
model's abort flag); the relay fires it itself, whatever the task awaits.
"""

from __future__ import annotations

import abc
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .._events import ProviderEvent, ToolCallDelta, ToolCallEnd, ToolCallStart
from .._exceptions import RequestError

logger = logging.getLogger("tokenwire")


class StopSignal:
    """The level-triggered stop of one generation: a reason once stopped, and what to run then.

    ``stop()`` is synchronous and runs every registered callback at once, in the
    caller's frame: a socket is aborted, a model's abort flag set, before any
    task has even been woken.  A callback registered after the stop runs at once.
    """

    __slots__ = ("reason", "_callbacks")

    def __init__(self) -> None:
        self.reason: str | None = None
        self._callbacks: list[Callable[[], None]] = []

    def stop(self, reason: str) -> bool:
        """Stop (the first reason wins); whether this call was the one that stopped it."""
        if self.reason is not None:
            return False
        self.reason = reason
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run_callback(callback)
        return True

    def on_stop(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` when stopped (now, if stopped already); returns what unregisters it."""
        if self.reason is not None:
            _run_callback(callback)
            return _nothing
        self._callbacks.append(callback)

        def remove() -> None:
            try:
                self._callbacks.remove(callback)
            except ValueError:
                pass

        return remove


def _run_callback(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # one broken callback must not keep the others from stopping their work
        logger.exception("a stop callback failed")


def _nothing() -> None:
    pass


#: The stop signal of the generation the current task runs (set by the relay).
current_stop: contextvars.ContextVar[StopSignal | None] = contextvars.ContextVar("tokenwire_stop", default=None)


def on_stop(callback: Callable[[], None]) -> Callable[[], None]:
    """Register ``callback`` on the current generation's stop signal, if there is one.

    For providers: call it once the thing to stop exists (a connected socket,
    a queued job), and call what it returns once that thing is finished with.
    Outside a relay's generation it does nothing.
    """
    signal = current_stop.get()
    if signal is None:
        return _nothing
    return signal.on_stop(callback)


@dataclass(frozen=True, slots=True)
class ReasoningRequest:
    """How much to think before answering: ``effort`` (OpenAI's ``reasoning_effort``), ``budget_tokens``
    (Anthropic's thinking budget), or both; a provider derives the one it needs from the other."""

    effort: str | None = None  # "minimal", "low", "medium" or "high"
    budget_tokens: int | None = None

    #: Anthropic thinking budgets for an effort, and the effort a budget is closest to.
    BUDGETS = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 24576}

    def budget(self) -> int:
        if self.budget_tokens is not None:
            return self.budget_tokens
        return self.BUDGETS[self.effort or "medium"]

    def effort_level(self) -> str:
        if self.effort is not None:
            return self.effort
        budget = self.budget()
        return next((e for e, b in self.BUDGETS.items() if budget <= b), "high")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One generation, in the OpenAI chat shapes (docs/protocol.md, "Requests"), already checked.

    ``messages`` are ``{"role", "content"}`` objects.  ``content`` is a string, or a
    list of ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url":
    {"url"}}`` parts; an assistant message may add ``tool_calls`` (and have
    ``content`` None) and ``reasoning`` (the blocks of its reasoning, each
    ``{"type": "reasoning", "text", "signature"}`` or ``{"type":
    "redacted_reasoning", "data"}``); a ``tool`` message has ``tool_call_id``.
    ``tools`` are function tools as OpenAI takes them.
    """

    messages: list[dict[str, Any]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning: ReasoningRequest | None = None

    @classmethod
    def from_prompt(cls, prompt: str, **options: Any) -> GenerationRequest:
        return cls(messages=[{"role": "user", "content": prompt}], **options)

    def has_images(self) -> bool:
        return any(
            isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
            for m in self.messages
        )

    def uses_tools(self) -> bool:
        """The request offers tools, or its history holds tool calls or results."""
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.messages)


class StreamingToolCall:
    """One tool call of an answer while it streams: its events, as docs/protocol.md orders them.

    ``start()`` and ``delta()`` give its ``ToolCallStart`` and each ``ToolCallDelta``;
    ``end()`` gives its ``ToolCallEnd`` with the fragments joined, after a
    ``ToolCallDelta("{}")`` when none came, so that a client always has arguments to parse.
    """

    __slots__ = ("index", "id", "name", "fragments")

    def __init__(self, index: int, call_id: str, name: str) -> None:
        self.index = index
        self.id = call_id
        self.name = name
        self.fragments: list[str] = []

    def start(self) -> ToolCallStart:
        return ToolCallStart(self.index, self.id, self.name)

    def delta(self, fragment: str) -> ToolCallDelta:
        self.fragments.append(fragment)
        return ToolCallDelta(self.index, fragment)

    def end(self) -> list[ProviderEvent]:
        events: list[ProviderEvent] = [] if self.fragments else [self.delta("{}")]
        events.append(ToolCallEnd(self.index, self.id, self.name, "".join(self.fragments)))
        return events


def message_text(message: dict[str, Any]) -> str:
    """A message's text: its content string, or its text parts joined (images and tool calls left out)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def available_cpus() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def unsupported(provider: str, what: str, fix: str, param: str | None = None) -> RequestError:
    """The 400 for a request that asks ``provider`` for something it cannot do; ``param`` names the field."""
    return RequestError(400, "invalid_request", f"the {provider} provider cannot take {what}; {fix}", param)


class Provider(abc.ABC):
    """One kind of model backend.  Subclasses set ``name`` and ``default_model``."""

    name: str = ""
    default_model: str = ""

    def model_for(self, request: GenerationRequest) -> str:
        return request.model or self.default_model

    def model_names(self) -> list[str] | None:
        """The models a request may name, or None when any name is passed upstream as it is."""
        return None

    def supports_model(self, model: str) -> bool:
        """Whether a request may ask for ``model``; the app answers 400 otherwise."""
        names = self.model_names()
        return names is None or model in names

    def check(self, request: GenerationRequest) -> None:
        """Refuse, with a :class:`~tokenwire.RequestError` that says what to change, a request this
        provider cannot serve as asked (images, tools, a response format); the app answers 400.
        The default takes everything: a provider passes what it does not refuse upstream."""

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """Yield the events of one generation; stop all work when closed or cancelled."""

    async def startup(self) -> None:
        """Acquire what the provider needs (a model, a connection pool)."""

    async def aclose(self) -> None:
        """Release it; every stream has ended by now."""
