"""The ``tokenwire-doctor`` model: test streams for ``tokenwire doctor``, stamped with their send times.

A server started with ``--diagnostics`` wraps its provider in :class:`Diagnostics`,
which serves one more model, ``tokenwire-doctor``, and hands every other request to
the provider it wraps.  A doctor stream's request is an ordinary ``POST /api/stream``
whose last user message is a JSON :class:`Plan`::

    {"model": "tokenwire-doctor", "messages": [{"role": "user", "content":
        "{\\"events\\": 120, \\"interval_ms\\": 50, \\"nonce\\": \\"5f0c…\\"}"}]}

Its answer is text, one line per token, so that any tokenwire client shows it:

- the first token is ``tokenwire-doctor {json}\\n``: the plan as the server took it,
  the stream's heartbeat interval (``null`` for none);
- then ``events`` tokens ``<k> <seconds>\\n``, padded to ``size`` bytes with dots, where
  ``<seconds>`` is when the server sent it, counted from the first token (the relay
  writes a token to the client as soon as it has it); after ``idle_after`` of them
  the stream is silent for ``idle_s`` seconds.

The wrapper remembers, per ``nonce``, how far each doctor stream got and when and why
its generation was stopped: the diagnostics route (``GET /api/doctor/{id}``) reports
that to the doctor, which checks that a client's abort reaches the model.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from .._events import Finish, ProviderEvent, Token, Usage
from .._exceptions import RequestError
from .base import GenerationRequest, Provider, current_stop, message_text

DOCTOR_MODEL = "tokenwire-doctor"
HEADER = "tokenwire-doctor "
MAX_RECORDS = 1000  # the doctor streams remembered, newest kept


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", f"a {DOCTOR_MODEL} stream: {message}", "messages")


def first_token(info: dict[str, Any]) -> str:
    """A doctor stream's first token: ``info`` (the plan as taken, the stream's heartbeat …)."""
    return HEADER + json.dumps(info, separators=(",", ":")) + "\n"


def read_first_token(text: str) -> dict[str, Any] | None:
    """What :func:`first_token` put in ``text``; ``None`` if ``text`` is not a doctor stream's first token."""
    if not text.startswith(HEADER):
        return None
    try:
        info = json.loads(text[len(HEADER) :])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


@dataclass(frozen=True, slots=True)
class Plan:
    """What a doctor stream sends; the bounds keep a test stream from becoming a load of its own."""

    nonce: str
    events: int = 120
    interval_ms: int = 50
    size: int = 64  # bytes of each token's text
    idle_after: int = 0  # the events before the silent gap
    idle_s: float = 0.0
    heartbeat: bool = True  # false: no keepalive comments during this stream (where the chain cuts)

    BOUNDS = {"events": (1, 2000), "interval_ms": (0, 1000), "size": (24, 4096), "idle_after": (0, 2000),
              "idle_s": (0, 600)}  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except ValueError:
            raise _invalid("the last user message must be the plan as a JSON object") from None
        if not isinstance(raw, dict):
            raise _invalid("the last user message must be the plan as a JSON object")
        known = {"nonce", "heartbeat", *cls.BOUNDS}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise _invalid(f"unknown field {unknown[0]!r}; the fields are {', '.join(sorted(known))}")
        nonce = raw.get("nonce")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 64 or not nonce.isascii() or not nonce.isalnum():
            raise _invalid("'nonce' must be 8 to 64 ASCII letters and digits, new for each stream")
        values: dict[str, Any] = {"nonce": nonce}
        for name, (low, high) in cls.BOUNDS.items():
            if name not in raw:
                continue
            value = raw[name]
            kind = float if name == "idle_s" else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise _invalid(f"{name!r} must be a number from {low} to {high}")
            if not low <= value <= high:
                raise _invalid(f"{name!r} must be from {low} to {high} (got {value})")
            values[name] = kind(value)
        if "heartbeat" in raw:
            if not isinstance(raw["heartbeat"], bool):
                raise _invalid("'heartbeat' must be true or false")
            values["heartbeat"] = raw["heartbeat"]
        return cls(**values)

    @classmethod
    def of(cls, request: GenerationRequest) -> Plan:
        users = [m for m in request.messages if m.get("role") == "user"]
        if not users:
            raise _invalid("send the plan as the last user message")
        return cls.parse(message_text(users[-1]))


@dataclass(slots=True)
class Record:
    """How far one doctor stream's generation got (times in seconds from its first token)."""

    events_sent: int = 0
    finished: bool = False
    stopped_after_s: float | None = None
    stop_reason: str | None = None


class Diagnostics(Provider):
    """``inner``, plus the ``tokenwire-doctor`` model.

    ``heartbeat`` (the server's interval) goes out in the first token; a silent gap must
    be shorter than ``idle_timeout``, after which the relay would end the stream as stalled.
    """

    def __init__(self, inner: Provider, *, heartbeat: float, idle_timeout: float) -> None:
        self.inner = inner
        self.idle_timeout = idle_timeout
        self.name = inner.name
        self.default_model = inner.default_model
        self.heartbeat = heartbeat
        self.records: collections.OrderedDict[str, Record] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"Diagnostics({self.inner!r})"

    def model_for(self, request: GenerationRequest) -> str:
        return DOCTOR_MODEL if request.model == DOCTOR_MODEL else self.inner.model_for(request)

    def model_names(self) -> list[str] | None:
        return self.inner.model_names()  # the doctor's model is not one to chat with: not listed

    def supports_model(self, model: str) -> bool:
        return model == DOCTOR_MODEL or self.inner.supports_model(model)

    def check(self, request: GenerationRequest) -> None:
        if request.model == DOCTOR_MODEL:
            plan = Plan.of(request)
            if plan.idle_s and plan.idle_s >= self.idle_timeout:
                raise _invalid(
                    f"'idle_s' must be under the server's --idle-timeout ({self.idle_timeout:g} s), "
                    "after which a silent model counts as stalled"
                )
        else:
            self.inner.check(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        if request.model != DOCTOR_MODEL:
            return self.inner.stream(request)
        plan = Plan.of(request)
        record = self.records.pop(plan.nonce, None) or Record()
        self.records[plan.nonce] = record
        while len(self.records) > MAX_RECORDS:
            self.records.popitem(last=False)
        return self._doctor(plan, record)

    def record(self, nonce: str) -> Record | None:
        return self.records.get(nonce)

    async def _doctor(self, plan: Plan, record: Record) -> AsyncIterator[ProviderEvent]:
        started = time.monotonic()
        signal = current_stop.get()  # the generation's; its callbacks run wherever the stop is called

        def stopped() -> None:
            if record.stopped_after_s is None:
                record.stopped_after_s = round(time.monotonic() - started, 6)
                record.stop_reason = signal.reason if signal is not None else None

        remove = signal.on_stop(stopped) if signal is not None else (lambda: None)
        info = {**asdict(plan), "stream_heartbeat": self.heartbeat if plan.heartbeat else None,
                "idle_timeout": self.idle_timeout, "server": "tokenwire"}  # fmt: skip
        try:
            yield Token(first_token(info))
            interval = plan.interval_ms / 1000
            for k in range(1, plan.events + 1):
                if k > 1 and interval:
                    await asyncio.sleep(interval)
                if k == plan.idle_after + 1 and plan.idle_after and plan.idle_s:
                    await asyncio.sleep(plan.idle_s)
                line = f"{k} {time.monotonic() - started:.6f} "
                yield Token(line.ljust(plan.size - 1, ".") + "\n")
                record.events_sent = k
            record.finished = True
            yield Finish("stop", Usage(plan.events + 1, 1))
        finally:
            remove()
            if not record.finished:
                stopped()  # closed without a stop signal (no relay): when its generator was closed

    async def startup(self) -> None:
        await self.inner.startup()

    async def aclose(self) -> None:
        await self.inner.aclose()
