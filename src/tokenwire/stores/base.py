"""Where streams live: the per-stream event log, idempotency keys, cancel signals.

A store holds, for each stream, its metadata and a bounded log of encoded SSE
events (``seq`` -> bytes) that responses tail.  The relay writes, responses read;
with a shared store (Redis) the reader may be another replica than the writer.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Stop a background task and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class StreamNotFound(LookupError):
    """No such stream, or it expired."""


class StreamEnded(LookupError):
    """The stream already has its terminal event (written by another, e.g. when its writer was lost)."""


class CursorAhead(LookupError):
    """The cursor is past the stream's last event."""

    def __init__(self, last_seq: int) -> None:
        super().__init__(f"the stream's last event is {last_seq}")
        self.last_seq = last_seq


class StoreUnavailable(Exception):
    """The store cannot be reached now (Redis down or unreachable); try again shortly."""


class LogTrimmed(LookupError):
    """The events asked for are older than what the bounded log still holds."""

    def __init__(self, first_available: int) -> None:
        super().__init__(f"events before seq {first_available} are no longer kept")
        self.first_available = first_available


@dataclass(frozen=True, slots=True)
class StreamMeta:
    stream_id: str
    principal: str
    model: str
    resumable: bool


@dataclass(slots=True)
class LogLimits:
    max_events: int = 100_000
    max_bytes: int = 16 * 1024 * 1024
    ttl: float = 600.0  # seconds a finished resumable stream stays resumable
    # A stream that is not resumable is kept only briefly after its end, for a
    # reader still sending its tail (and an Idempotency-Key retry racing it).
    unresumable_ttl: float = 5.0

    def ttl_for(self, resumable: bool) -> float:
        return self.ttl if resumable else min(self.ttl, self.unresumable_ttl)


@dataclass(slots=True)  # not frozen: one per read, for every token; frozen sets fields via object.__setattr__
class ReadResult:
    entries: list[bytes]  # encoded events, consecutive, starting after the cursor
    next_seq: int  # the seq of the last entry (the cursor to pass next time)
    ended: bool  # the terminal event is among what has been read


CancelCallback = Callable[[str], Awaitable[None] | None]

class Follower(Protocol):
    """A reader handed each new event from inside ``append`` (see :meth:`StreamStore.follow`)."""

    def __call__(self, data: bytes, terminal: bool) -> bool:
        """Take the next event; return whether it wants the one after too."""

    def release(self) -> None:
        """The store hands it no more events (it cannot, for now): it reads them with ``read`` instead."""


#: ``lost_writer_event(seq)``: the encoded terminal event numbered ``seq`` that a
#: store appends to a stream whose writer is gone (see StreamStore.lost_writer_event).
LostWriterEvent = Callable[[int], bytes]


class StreamStore(abc.ABC):
    """The interface every store implements; one contract test suite covers them all.

    Errors: :class:`StoreUnavailable` from any method while a shared store cannot be
    reached; a store that rides out outages says for how long in ``outage_timeout``.
    """

    limits: LogLimits
    #: Seconds readers and writers wait for an unreachable store before giving up (0: never unreachable).
    outage_timeout: float = 0.0
    #: Set by the relay: how the store encodes the terminal event it appends, once and atomically,
    #: to a stream whose writer it finds gone (a shared store; the memory store's writer cannot be).
    lost_writer_event: LostWriterEvent | None = None

    @abc.abstractmethod
    async def create(self, meta: StreamMeta) -> None: ...

    @abc.abstractmethod
    async def discard(self, stream_id: str) -> None:
        """Forget a stream that was created but lost its idempotency claim (never started)."""

    @abc.abstractmethod
    async def get_meta(self, stream_id: str) -> StreamMeta | None: ...

    @abc.abstractmethod
    async def append(self, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> bool | None:
        """Add the event numbered ``seq`` (1, 2, 3 … without gaps).

        Appending the last event again is a no-op (a retry of an append that may have
        landed).  Returns True when a stop of the stream was requested through the
        store (a cancel that another replica received), so that the writer stops even
        if the signal itself was lost.  Raises :class:`StreamNotFound`,
        :class:`StreamEnded` (another wrote its terminal event) or :class:`StoreUnavailable`.
        """

    @abc.abstractmethod
    async def read(self, stream_id: str, after: int, *, timeout: float) -> ReadResult:
        """Events with seq > ``after``; waits up to ``timeout`` s for the first one.

        ``timeout=0`` never waits.  Returns an empty result on timeout.  Raises :class:`StreamNotFound`,
        :class:`LogTrimmed` or :class:`CursorAhead`.
        """

    @abc.abstractmethod
    async def claim_idempotency_key(
        self, scope: str, fingerprint: str, stream_id: str
    ) -> tuple[str, str] | None:
        """Atomically bind ``scope`` to ``stream_id`` unless already bound.

        Returns ``None`` when the claim succeeded, else the ``(stream_id,
        fingerprint)`` already bound.
        """

    async def bind_chat(self, scope: str, stream_id: str) -> None:
        """Make ``stream_id`` the stream of chat ``scope`` (the AI SDK's resume), in place of any earlier one."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume chats")

    async def chat_stream(self, scope: str) -> str | None:
        """The stream last bound to chat ``scope``, if it is still kept."""
        raise NotImplementedError(f"{type(self).__name__} cannot resume chats")

    @abc.abstractmethod
    async def publish_cancel(self, stream_id: str) -> None:
        """Ask whichever replica runs ``stream_id`` to cancel it."""

    @abc.abstractmethod
    async def subscribe_cancel(self, callback: CancelCallback) -> None:
        """Call ``callback(stream_id)`` for every cancel published from now on."""

    @abc.abstractmethod
    async def touch_reader(self, stream_id: str, reader_id: str, lease: float) -> None:
        """Record that ``reader_id`` is reading ``stream_id``, for ``lease`` seconds.

        Readers may be on another replica than the generation; the generation's
        replica asks :meth:`has_readers` before it gives up on a resumable stream.
        """

    @abc.abstractmethod
    async def drop_reader(self, stream_id: str, reader_id: str) -> None: ...

    @abc.abstractmethod
    async def has_readers(self, stream_id: str) -> bool:
        """Whether any reader's lease on ``stream_id`` is still running."""

    def follow(self, stream_id: str, after: int, follower: Follower) -> bool:
        """Hand every event appended from now on to ``follower``, from inside :meth:`append`.

        For a reader in the same process as the generation: instead of waking
        up in :meth:`read` for each token, it is handed each one as it is
        appended, and writes it at once.  Only if ``after`` is the live end of
        the log (nothing to read, not ended); a follower is dropped as soon as it
        returns False, or by :meth:`unfollow`, or when the store can no longer hand
        it events (it calls ``follower.release()``).  Returns False when the store
        cannot (the default: a shared store's appends may happen in another process).
        """
        return False

    def unfollow(self, stream_id: str, follower: Follower) -> None:
        """Stop handing events to ``follower`` (if it is still following)."""

    #: Whether this store counts per-key stream slots across processes (reserve_slot/release_slot).
    #: A store of one process leaves the count to the relay, which holds it with no await.
    counts_slots: bool = False

    async def reserve_slot(self, principal: str, limit: int) -> bool:
        """Atomically count one more stream of ``principal`` unless it has ``limit`` already (all replicas).

        A dead replica's slots must come back by themselves (an expiring lease).
        """
        return True

    async def release_slot(self, principal: str) -> None:
        """Give back a slot :meth:`reserve_slot` counted."""

    async def check(self) -> None:
        """Raise :class:`StoreUnavailable` if the store cannot be used now (for health checks)."""

    async def startup(self) -> None:
        """Connect, start background work."""

    async def aclose(self) -> None:
        """Disconnect, stop background work."""
