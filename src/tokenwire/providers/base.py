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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from .._events import ProviderEvent

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
class GenerationRequest:
    messages: list[dict[str, str]]
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def from_prompt(cls, prompt: str, **options: Any) -> GenerationRequest:
        return cls(messages=[{"role": "user", "content": prompt}], **options)


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

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        """Yield the events of one generation; stop all work when closed or cancelled."""

    async def startup(self) -> None:
        """Acquire what the provider needs (a model, a connection pool)."""

    async def aclose(self) -> None:
        """Release it; every stream has ended by now."""
