"""The provider interface: a model as an async stream of events.

A provider turns one :class:`GenerationRequest` into an async iterator of
``Queued`` / ``Token`` / ``Reasoning`` events that ends with one ``Finish``, or
raises :class:`~tokenwire.ProviderError`.  The relay owns the iteration in a
task of its own; cancelling that task (or ``aclose()`` on the iterator) must stop
the work behind it at once: close the upstream socket, stop the local model.
Nothing here knows about HTTP responses.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .._events import ProviderEvent


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
