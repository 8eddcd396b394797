"""The relay: runs each generation as a task it owns, from provider to log.

Starlette never closes a response's body iterator when its client leaves, so the
generation is not the response's iterator: it runs in a task the relay cancels itself.
:meth:`Relay.start` creates a stream, writes its events into the store's log from
a task of its own and returns at once; responses (:mod:`tokenwire._response`)
tail the log.

Stopping a generation (client gone, ``DELETE`` here or on another replica,
deadline, stalled upstream, shutdown) is level-triggered, so that it cannot be
lost: the relay fires the generation's :class:`~tokenwire.providers.base.StopSignal`,
which aborts the upstream socket or stops the local model at once, in the
caller's frame; it also cancels the task, and the task checks the signal after
every await, so a ``CancelledError`` swallowed by library code (Python 3.11's
``asyncio.wait_for``, python/cpython#86296) still stops it at its next step.

Every stream's log ends with exactly one terminal event, whatever happens: an
append that a cancel interrupted is written again (appends are idempotent) before it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._events import (
    COUNTED_OUTPUT,
    Done,
    Error,
    Finish,
    Queued,
    Start,
    StreamEvent,
    Token,
    Usage,
    UsageUpdate,
    encode_event,
    encode_token_event,
)
from ._exceptions import AdmissionRefused, IdempotencyConflict, ProviderError
from ._metrics import Metrics
from .providers.base import GenerationRequest, Provider, StopSignal, current_stop
from .stores.base import StoreUnavailable, StreamEnded, StreamMeta, StreamNotFound, StreamStore
from .stores.memory import MemoryStore

logger = logging.getLogger("tokenwire")


class Writer(Protocol):
    """A response writing to a client, as the send-timeout sweeper sees it."""

    pending_since: float | None  # loop time its pending write began; None when no write is pending

    def drop(self) -> None:
        """End the response: its client has not accepted a write for the send timeout."""


@dataclass(slots=True)
class RelayOptions:
    heartbeat: float = 15.0  # seconds of silence before a ": keepalive" comment
    max_duration: float = 600.0  # total deadline of one generation
    resume_grace: float = 30.0  # how long a resumable stream outlives its last reader
    send_timeout: float = 30.0  # a client that takes longer to accept one write is dropped
    first_token_timeout: float = 120.0  # upstream silence before its first token (queue time excluded)
    idle_timeout: float = 60.0  # upstream silence between two tokens
    retry_ms: int = 1000  # the "retry:" sent first, for reconnecting clients


@dataclass(slots=True, eq=False)
class Slot:
    """A reserved place under the stream caps, held from admission to the generation's end."""

    principal: str
    shared: bool = False  # also counted in the store, across replicas
    released: bool = False


# Why a generation stopped (StopSignal.reason) when it is not a cancel.
DEADLINE = "the generation reached its deadline"
STALLED = "the upstream stalled"
SHUTDOWN = "the server is shutting down"
CANCELLED_ELSEWHERE = "cancelled by request on another replica"

REPLICA_LOST = Error(
    "replica_lost",
    "the replica running this stream stopped before finishing it; start the stream again",
    retryable=True,
)


@dataclass(slots=True)
class _Generation:
    """What this process knows of a stream it runs."""

    meta: StreamMeta
    slot: Slot
    task: asyncio.Task[None] | None = None
    # A task cancelled before its first step never runs its body (no finally,
    # so no terminal event): until it runs, a stop is only the flag it checks.
    running: bool = False
    stop: StopSignal = field(default_factory=StopSignal)
    readers: int = 0
    grace_timer: asyncio.TimerHandle | None = None
    started: float = field(default_factory=lambda: asyncio.get_running_loop().time())


#: New streams admitted per turn of the event loop (see _Turns).
STARTS_PER_TURN = 4


class _Turns:
    """At most ``per_turn`` new streams are admitted per turn of the event loop; the rest wait their turn.

    A burst of requests arrives in one poll of the sockets, and each handler runs its
    whole start (body, validation, store, the generation's task, the response's start)
    without a pause; the tokens of the streams already running would wait behind every
    one of them (200 at once: tens of milliseconds).  Taken a few per turn, with a
    poll of the sockets between two turns, the running streams wait behind one batch.
    A request that arrives while no one waits is admitted at once.
    """

    __slots__ = ("per_turn", "_granted", "_waiting", "_handle")

    def __init__(self, per_turn: int = STARTS_PER_TURN) -> None:
        self.per_turn = per_turn
        self._granted = 0  # admitted in this turn
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._handle: asyncio.Handle | None = None

    async def take(self) -> None:
        """Wait for this turn's place, or a later turn's."""
        loop = asyncio.get_running_loop()
        if self._handle is None:  # the next turn resets the count
            self._handle = loop.call_soon(self._next_turn)
        if self._granted < self.per_turn and not self._waiting:
            self._granted += 1
            return
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        await waiter  # cancelled (the client left): it is skipped when its turn comes

    def _next_turn(self) -> None:
        self._handle = None
        self._granted = 0
        while self._waiting and self._granted < self.per_turn:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._granted += 1
        if self._granted:  # the next turn resets the count again, and goes on with the line
            self._handle = asyncio.get_running_loop().call_soon(self._next_turn)


def new_stream_id() -> str:
    """128 random bits: unguessable, URL-safe."""
    return "str_" + secrets.token_urlsafe(16)


def fingerprint_of(body: Any) -> str:
    """A digest of what was asked, to tell a retry from a different request."""
    if dataclasses.is_dataclass(body) and not isinstance(body, type):
        body = dataclasses.asdict(body)
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    # surrogatepass: a JSON body may hold a lone surrogate ("\ud800"), which strict UTF-8 refuses.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()


class Relay:
    """Owns the provider, the store and every running generation."""

    def __init__(
        self,
        provider: Provider,
        *,
        store: StreamStore | None = None,
        options: RelayOptions | None = None,
    ) -> None:
        self.provider = provider
        self.store = store if store is not None else MemoryStore()  # an empty MemoryStore is falsy (__len__)
        self.options = options or RelayOptions()
        self._running: dict[str, _Generation] = {}
        self._housekeeping: set[asyncio.Task[None]] = set()
        self._turns = _Turns()
        self._reserved = 0  # slots held: streams running, and requests admitted that have not started yet
        self._per_principal: dict[str, int] = {}  # the same, by principal
        self._writers: set[Writer] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.metrics = Metrics(active_streams=self._running.__len__)
        self._started = False
        self.store.lost_writer_event = _encode_replica_lost

    # -- lifecycle ---------------------------------------------------------

    async def startup(self) -> None:
        if self._started:
            return
        await self.store.startup()
        await self.store.subscribe_cancel(self._on_cancel_published)
        await self.provider.startup()
        self._started = True

    def watch_writes(self, response: Writer) -> None:
        """Drop ``response`` if one of its writes stays pending past the send timeout."""
        self._writers.add(response)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_stuck_writers(), name="tokenwire-send-timeouts")

    def unwatch_writes(self, response: Writer) -> None:
        self._writers.discard(response)
        if not self._writers and self._sweeper is not None:
            self._sweeper.cancel()  # nothing to watch: no task left behind
            self._sweeper = None

    async def _sweep_stuck_writers(self) -> None:
        # One timer for every response instead of one per write: a write costs two
        # attribute stores, and a stuck client is dropped within 1.25 send timeouts.
        loop = asyncio.get_running_loop()
        timeout = self.options.send_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))
            now = loop.time()
            for response in list(self._writers):
                since = response.pending_since
                if since is not None and now - since >= timeout:
                    response.drop()

    async def aclose(self) -> None:
        """Cancel every generation, wait for their logs to end, release all."""
        for task in list(self._housekeeping):
            task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = [g.task for g in self._running.values() if g.task is not None]
        for generation in list(self._running.values()):
            self._stop(generation, SHUTDOWN)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.provider.aclose()
        await self.store.aclose()
        self._started = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[None]:
        """For ``Starlette(lifespan=relay.lifespan)`` / ``FastAPI(lifespan=...)``."""
        await self.startup()
        try:
            yield
        finally:
            await self.aclose()

    async def __aenter__(self) -> Relay:
        await self.startup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def active_streams(self) -> int:
        return len(self._running)

    def active_streams_of(self, principal: str) -> int:
        """Slots ``principal`` holds here: its running streams and its requests being admitted."""
        return self._per_principal.get(principal, 0)

    # -- admission -----------------------------------------------------------

    async def reserve(
        self, principal: str = "", *, max_streams: int | None = None, max_per_key: int | None = None
    ) -> Slot:
        """Take a place under the caps, before anything else of the request is read.

        Each cap is checked and reserved with no ``await`` in between, so that
        concurrent requests cannot all pass one check before any reserves (and a
        request whose body is still arriving already counts).  With a shared store
        the per-key cap holds across replicas: the store checks and counts it
        atomically.  Raises :class:`AdmissionRefused`.  The slot goes to
        :meth:`start`, which hands it to the generation; release it yourself only
        if you never call :meth:`start`.
        """
        await self._turns.take()  # a burst of new streams is taken a few at a time (_Turns)
        if max_streams is not None and self._reserved >= max_streams:
            raise AdmissionRefused("server", max_streams)
        held = self._per_principal.get(principal, 0)
        if max_per_key is not None and held >= max_per_key:
            raise AdmissionRefused("key", max_per_key)
        self._reserved += 1
        self._per_principal[principal] = held + 1
        slot = Slot(principal)
        if max_per_key is not None and self.store.counts_slots:
            try:
                admitted = await self.store.reserve_slot(principal, max_per_key)
            except BaseException:
                self.release(slot)
                raise
            slot.shared = admitted
            if not admitted:
                self.release(slot)
                raise AdmissionRefused("key", max_per_key)
        return slot

    def release(self, slot: Slot) -> None:
        """Give a slot back (once; a second call does nothing)."""
        if slot.released:
            return
        slot.released = True
        self._reserved -= 1
        left = self._per_principal.pop(slot.principal, 1) - 1
        if left:
            self._per_principal[slot.principal] = left
        if slot.shared:
            self._background(self._release_shared(slot.principal))

    async def _release_shared(self, principal: str) -> None:
        try:
            await self.store.release_slot(principal)
        except Exception as exc:  # the store recounts this replica's slots when it is back
            logger.warning("cannot release a stream slot in the store now (%s)", exc)

    # -- streams -----------------------------------------------------------

    async def start(
        self,
        request: GenerationRequest,
        *,
        principal: str = "",
        resumable: bool = False,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        slot: Slot | None = None,
    ) -> tuple[StreamMeta, bool]:
        """Start a generation, or find the one this idempotency key started.

        Returns ``(meta, created)``.  Raises :class:`IdempotencyConflict`.  ``slot``
        (from :meth:`reserve`) is the generation's from now on, or given back here
        when none starts; without one, the generation takes one outside the caps.
        """
        if slot is None:
            slot = await self.reserve(principal)
        try:
            meta, created = await self._start(request, principal, resumable, idempotency_key, fingerprint, slot)
        except BaseException:
            self.release(slot)
            raise
        if not created:
            self.release(slot)
        return meta, created

    async def _start(
        self,
        request: GenerationRequest,
        principal: str,
        resumable: bool,
        idempotency_key: str | None,
        fingerprint: str | None,
        slot: Slot,
    ) -> tuple[StreamMeta, bool]:
        meta = StreamMeta(
            stream_id=new_stream_id(),
            principal=principal,
            model=self.provider.model_for(request),
            resumable=resumable,
        )
        # Create before claiming: whoever loses the claim finds the winner's
        # stream already there, on any replica.
        await self.store.create(meta)
        if idempotency_key is not None:
            fingerprint = fingerprint or fingerprint_of(request)
            scope = f"{principal}\x00{idempotency_key}"
            try:
                existing = await self.store.claim_idempotency_key(scope, fingerprint, meta.stream_id)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.store.discard(meta.stream_id)  # a stream nobody will write
                raise
            if existing is not None:
                await self.store.discard(meta.stream_id)
                stream_id, bound_fingerprint = existing
                if bound_fingerprint != fingerprint:
                    raise IdempotencyConflict(idempotency_key)
                found = await self.store.get_meta(stream_id)
                if found is None:
                    raise IdempotencyConflict(idempotency_key)
                return found, False
        generation = _Generation(meta, slot)
        self._running[meta.stream_id] = generation
        generation.task = asyncio.create_task(
            self._run(generation, request), name=f"tokenwire-generation-{meta.stream_id}"
        )
        return meta, True

    async def get(self, stream_id: str, principal: str = "") -> StreamMeta | None:
        """The stream, if it exists, has not expired, and belongs to ``principal``."""
        meta = await self.store.get_meta(stream_id)
        if meta is None or not secrets.compare_digest(meta.principal, principal):
            return None
        return meta

    async def bind_chat(self, principal: str, chat_id: str, stream_id: str) -> None:
        """Make ``stream_id`` the stream a reader of chat ``chat_id`` resumes (the AI SDK's ``resume``)."""
        await self.store.bind_chat(f"{principal}\x00{chat_id}", stream_id)

    async def chat_stream(self, principal: str, chat_id: str) -> StreamMeta | None:
        """The last stream bound to ``principal``'s chat ``chat_id``, while the store keeps it."""
        stream_id = await self.store.chat_stream(f"{principal}\x00{chat_id}")
        return await self.get(stream_id, principal) if stream_id is not None else None

    async def cancel(self, stream_id: str) -> None:
        """Cancel wherever the generation runs: here at once, elsewhere via the store."""
        if not self._cancel_local(stream_id, "cancelled by request"):
            await self.store.publish_cancel(stream_id)

    def attach(self, stream_id: str) -> None:
        """A response started reading this stream."""
        generation = self._running.get(stream_id)
        if generation is None:
            return
        generation.readers += 1
        if generation.grace_timer is not None:
            generation.grace_timer.cancel()
            generation.grace_timer = None

    def detach(self, stream_id: str, *, client_gone: bool) -> None:
        """A response stopped reading; cancel the generation if nobody will come back."""
        generation = self._running.get(stream_id)
        if generation is None:
            return
        generation.readers -= 1
        if not client_gone or generation.readers > 0:
            return
        if not generation.meta.resumable:
            self._cancel_local(stream_id, "client disconnected")
        elif generation.grace_timer is None:
            self._arm_grace_timer(generation)

    def _arm_grace_timer(self, generation: _Generation) -> None:
        generation.grace_timer = asyncio.get_running_loop().call_later(
            self.options.resume_grace, self._grace_expired, generation
        )

    def _grace_expired(self, generation: _Generation) -> None:
        # The client may have come back through another replica: ask the store.
        async def check() -> None:
            stream_id = generation.meta.stream_id
            try:
                back = await self.store.has_readers(stream_id)
            except Exception:
                logger.exception("cannot check the readers of %s; keeping it", stream_id)
                back = True
            if generation.readers > 0 or generation.task is None or generation.task.done():
                return
            if back:
                self._arm_grace_timer(generation)
            else:
                self._cancel_local(stream_id, "no client came back within the resume grace period")

        generation.grace_timer = None
        self._background(check())

    def _background(self, coro: Any) -> None:
        self.adopt(asyncio.create_task(coro))

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Keep ``task`` until it ends; aclose() cancels it if it has not."""
        self._housekeeping.add(task)
        task.add_done_callback(self._housekeeping.discard)

    def _cancel_local(self, stream_id: str, reason: str) -> bool:
        generation = self._running.get(stream_id)
        if generation is None or generation.task is None:
            return False
        self._stop(generation, reason)
        return True

    @staticmethod
    def _stop(generation: _Generation, reason: str) -> None:
        """Stop a generation: its upstream now (the signal's callbacks), its task at its next step."""
        if not generation.stop.stop(reason):
            return  # stopped already: one cancel per task, so none lands on its terminal write
        logger.debug("stopping %s: %s", generation.meta.stream_id, reason)
        task = generation.task
        # Not before its first step (it would never run, and write no terminal event), and not
        # from inside (the cancel would land on the terminal write): the flag does it there.
        if task is not None and generation.running and not task.done() and task is not asyncio.current_task():
            task.cancel(reason)

    async def _on_cancel_published(self, stream_id: str) -> None:
        self._cancel_local(stream_id, CANCELLED_ELSEWHERE)

    # -- the generation task ----------------------------------------------

    async def _run(self, generation: _Generation, request: GenerationRequest) -> None:
        """The generation's task: its events into the log, then exactly one terminal event."""
        generation.running = True
        current_stop.set(generation.stop)  # providers register what stops their work (providers.base.on_stop)
        self.metrics.streams_started += 1
        progress = _Progress()
        terminal: StreamEvent | None = None
        write_terminal = True
        try:
            if generation.stop.reason is not None:  # stopped before this task's first step
                raise asyncio.CancelledError
            terminal = await self._generate(generation, request, progress)
        except asyncio.CancelledError:
            _uncancel()
        except Exception as exc:  # noqa: BLE001 - every failure becomes the stream's terminal event
            terminal, write_terminal = self._failure(generation, exc)
        finally:
            await self._end(generation, progress, terminal, write_terminal)

    async def _generate(
        self, generation: _Generation, request: GenerationRequest, progress: _Progress
    ) -> StreamEvent | None:
        """Append the provider's events to the log; the terminal event, or None once stopped.

        The token branch is the relay's hot path: it appends inline, without ``emit``,
        and keeps its counts in locals, handed to ``progress`` when this returns or raises.
        """
        stop = generation.stop
        stream_id = generation.meta.stream_id
        store = self.store
        options = self.options
        metrics = self.metrics
        loop = asyncio.get_running_loop()
        last_token_at = generation.started
        seq = confirmed = tokens = 0
        last_data = b""
        phase = progress.phase

        async def emit(event: StreamEvent) -> None:
            nonlocal seq, confirmed, last_data
            seq += 1
            last_data = encode_event(seq, event)
            if await store.append(stream_id, seq, last_data):
                self._stop(generation, CANCELLED_ELSEWHERE)
            confirmed = seq
            if stop.reason is not None:
                raise asyncio.CancelledError

        deadline = stall = stream = None
        try:
            await emit(Start(stream_id, generation.meta.model))
            stream = self.provider.stream(request)
            deadline = loop.call_later(options.max_duration, self._stop, generation, DEADLINE)
            # One watch for "no token yet" and "no token lately", moved by every token, so
            # that heartbeats to the client never hide a stalled upstream.
            stall = _StallWatch(loop, options.first_token_timeout, lambda: self._stop(generation, STALLED))
            async for event in stream:
                kind = type(event)
                if kind is Token:
                    now = loop.time()
                    if tokens:
                        metrics.inter_token_delay.observe(now - last_token_at)
                    else:
                        metrics.time_to_first_token.observe(now - generation.started)
                        phase = "mid_stream"
                    last_token_at = now
                    stall.move(now + options.idle_timeout)
                    tokens += 1
                    seq += 1
                    last_data = encode_token_event(seq, event.text)  # type: ignore[union-attr]
                    if await store.append(stream_id, seq, last_data):
                        self._stop(generation, CANCELLED_ELSEWHERE)
                    confirmed = seq
                    if stop.reason is not None:
                        raise asyncio.CancelledError
                elif kind is Finish:
                    progress.tokens = tokens
                    return Done(event.finish_reason, event.usage or progress.usage(), event.upstream_reason)  # type: ignore[union-attr]
                elif kind is UsageUpdate:
                    progress.reported = event.usage  # type: ignore[union-attr]
                else:
                    if kind is Queued:
                        phase = "queued"
                        stall.move(None)  # waiting for the model is bounded by the deadline
                    else:
                        if phase == "queued":
                            phase = "before_first_token"
                        # Reasoning, a refusal and tool calls are output too: each restarts
                        # the wait for the next (a long arguments stream is not a stall).
                        wait = options.idle_timeout if tokens else options.first_token_timeout
                        stall.move(loop.time() + wait)
                        if kind in COUNTED_OUTPUT:
                            progress.other_output += 1
                    await emit(event)  # type: ignore[arg-type]
            if stop.reason is None:
                return Error("upstream_error", "the model ended the stream without finishing it", True)
            return None
        finally:
            progress.seq, progress.confirmed, progress.last_data = seq, confirmed, last_data
            progress.tokens, progress.phase = tokens, phase
            if deadline is not None:
                deadline.cancel()
            if stall is not None:
                stall.close()
            if stream is not None:
                await stream.aclose()  # type: ignore[attr-defined]

    def _failure(self, generation: _Generation, exc: Exception) -> tuple[StreamEvent | None, bool]:
        """The terminal event for what a generation raised, and whether this replica writes it."""
        stop = generation.stop
        stream_id = generation.meta.stream_id
        if isinstance(exc, ProviderError):
            # After a stop, an error is what the abort did to the upstream: the stop says why.
            return (Error(exc.error_type, exc.message, exc.retryable) if stop.reason is None else None), True
        if isinstance(exc, StoreUnavailable):
            stop.stop("the store is unavailable")
            message = f"the stream store was unreachable for longer than {self.store.outage_timeout:g} s; retry shortly"
            return Error("store_unavailable", message, retryable=True), True
        if isinstance(exc, (StreamNotFound, StreamEnded)):
            # Another wrote its terminal event (this replica's lease had lapsed), or the log expired.
            stop.stop("the stream ended in the store")
            logger.warning("stream_id=%s stopped: %s in the store", stream_id, type(exc).__name__)
            return REPLICA_LOST, False
        logger.error("generation %s failed", stream_id, exc_info=exc)
        return Error("internal_error", "the generation failed inside tokenwire; see the server log"), True

    async def _end(
        self, generation: _Generation, progress: _Progress, terminal: StreamEvent | None, write_terminal: bool
    ) -> None:
        """Release what the generation held; write, count and log its terminal event."""
        stream_id = generation.meta.stream_id
        self._running.pop(stream_id, None)
        self.release(generation.slot)
        if generation.grace_timer is not None:
            generation.grace_timer.cancel()
        if terminal is None:
            terminal = _terminal_for(generation.stop.reason, progress.tokens, progress.usage(), self.options)
        if write_terminal:
            await self._write_terminal(stream_id, progress.seq, progress.confirmed, progress.last_data, terminal)
        self._count_outcome(terminal, progress.phase)
        self._log_stream(generation.meta, terminal, progress.tokens, generation)

    async def _write_terminal(
        self, stream_id: str, seq: int, confirmed: int, last_data: bytes, terminal: StreamEvent
    ) -> None:
        """Append the terminal event; never raises (the generation is over either way)."""
        store = self.store
        try:
            if confirmed < seq:
                # A cancel interrupted that append: it may not have landed.  Again, idempotently.
                with contextlib.suppress(StoreUnavailable):  # it is buffered: the store writes it later
                    await store.append(stream_id, seq, last_data)
            await store.append(stream_id, seq + 1, encode_event(seq + 1, terminal), terminal=True)
        except (StreamNotFound, StreamEnded):
            pass  # expired, or ended by a reader that found this replica's lease lapsed
        except StoreUnavailable:
            logger.warning("stream_id=%s: the store is unavailable; its readers end it themselves", stream_id)
        except Exception:
            logger.exception("cannot write the terminal event of %s", stream_id)

    def _count_outcome(self, terminal: StreamEvent, phase: str) -> None:
        metrics = self.metrics
        if isinstance(terminal, Done):
            metrics.finished[terminal.finish_reason] += 1
            if terminal.finish_reason == "cancelled":
                metrics.cancellations[phase] += 1
        else:
            assert isinstance(terminal, Error)
            metrics.finished[terminal.error_type] += 1
            metrics.upstream_errors[terminal.error_type] += 1

    def _log_stream(self, meta: StreamMeta, terminal: StreamEvent, tokens: int, generation: _Generation) -> None:
        """One structured line per stream (logfmt), with nothing of the prompt or any key."""
        elapsed = asyncio.get_running_loop().time() - generation.started
        outcome = terminal.finish_reason if isinstance(terminal, Done) else terminal.error_type  # type: ignore[union-attr]
        logger.info(
            "stream_id=%s principal=%s model=%s resumable=%s outcome=%s completion_tokens=%d duration_ms=%.0f",
            meta.stream_id,
            _principal_label(meta.principal),
            json.dumps(meta.model),
            str(meta.resumable).lower(),
            outcome,
            tokens,
            elapsed * 1000,
        )


@dataclass(slots=True)
class _Progress:
    """How far a generation got: what its terminal event and its metrics need."""

    seq: int = 0  # the last seq appended, or being appended
    confirmed: int = 0  # the last seq the store confirmed
    last_data: bytes = b""  # the bytes of event ``seq``: appended again if a cancel interrupted it
    tokens: int = 0
    other_output: int = 0  # reasoning, refusal and tool-argument fragments: completion tokens too
    phase: str = "before_first_token"  # where a cancel found it, for the metrics
    reported: Usage = field(default_factory=lambda: Usage(0))  # the provider's running usage, if any

    def usage(self) -> Usage:
        produced = self.tokens + self.other_output
        return Usage(max(produced, self.reported.completion_tokens), self.reported.prompt_tokens)


def _uncancel() -> None:
    """We own this task and end it ourselves: forget the cancellation we are handling."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        task.uncancel()


def _terminal_for(reason: str | None, tokens: int, usage: Usage, options: RelayOptions) -> StreamEvent:
    """The terminal event of a generation that was stopped for ``reason``."""
    if reason == DEADLINE:
        return Done("timeout", usage)
    if reason == STALLED:
        limit, what = (
            (options.idle_timeout, "between two tokens") if tokens else (options.first_token_timeout, "before the first token")
        )
        return Error("upstream_timeout", f"the model sent nothing for {limit:g} s {what}", True)
    return Done("cancelled", usage)


def _encode_replica_lost(seq: int) -> bytes:
    return encode_event(seq, REPLICA_LOST)


class _StallWatch:
    """A deadline that the token path moves by writing a float.

    Its single timer is re-armed lazily, when it fires early, instead of once per
    token (``asyncio.Timeout.reschedule`` pushes a timer onto the heap each time).
    When it expires it calls ``on_expiry`` (which stops the generation).
    """

    __slots__ = ("deadline", "_loop", "_on_expiry", "_handle", "_armed_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, on_expiry: Callable[[], None]) -> None:
        self._loop = loop
        self._on_expiry = on_expiry
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self.deadline: float | None = None
        self.move(loop.time() + timeout)

    def move(self, deadline: float | None) -> None:
        self.deadline = deadline
        if deadline is None:
            return  # the armed timer, if any, finds no deadline and stops
        if self._handle is None or deadline < self._armed_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        deadline = self.deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._on_expiry()
        else:
            self._arm(deadline)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _principal_label(principal: str) -> str:
    return principal or "anonymous"
