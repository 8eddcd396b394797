"""The ASGI application: routes, validation and limits; no streaming logic of its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _ai_sdk as ai_sdk
from . import _openai_api as openai_api
from ._auth import KeyRing
from ._config import Settings
from ._exceptions import AdmissionRefused, IdempotencyConflict, RequestError
from ._relay import Relay, Slot, fingerprint_of
from ._message import accumulate
from ._metrics import SharedMetrics
from ._response import (
    EventStreamResponse,
    WholeAnswerResponse,
    error_response,
    not_found,
    store_unavailable,
)
from ._validation import invalid, parse_stream_request
from .providers.base import Provider
from .providers.doctor import DOCTOR_MODEL, Diagnostics, Plan, read_first_token
from .stores.base import StoreUnavailable, StreamMeta, StreamStore

logger = logging.getLogger("tokenwire")

T = TypeVar("T")

MAX_IDEMPOTENCY_KEY = 255
AI_SDK_HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}
# The status of a whole answer (OpenAI's stream: false) whose stream ended with an error.
ANSWER_ERROR_STATUS = {"upstream_error": 502, "upstream_timeout": 504, "replica_lost": 503, "store_unavailable": 503}
NO_HEARTBEAT = 86400.0  # a doctor stream's "heartbeat": false
HEALTH_CHECK_TIMEOUT = 1.0  # seconds /healthz waits for the store before calling it down


def _static(name: str) -> bytes:
    return resources.files("tokenwire").joinpath("static", name).read_bytes()


async def read_json_body(request: Request, limit: int) -> Any:
    """The request's JSON body; 415 / 413 / 400 errors that say what to fix."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise RequestError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: application/json' (got {content_type or 'none'!r})",
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "too_large", f"the body is {declared} bytes; the limit is {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, ints over 4300 digits, deep nesting
        raise invalid(f"the body is not valid JSON: {exc}") from None


def parse_cursor(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    if raw is None:
        raw = request.query_params.get("after")
    if raw is None or raw == "":
        return 0
    # isdigit() alone admits "²" and other digits int() refuses; 19 digits hold any seq.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19:
        raise invalid("Last-Event-ID / ?after= must be the seq number of the last event received", "after")
    return int(raw)


def create_app(
    settings: Settings | None = None,
    *,
    provider: Provider | None = None,
    store: StreamStore | None = None,
    relay: Relay | None = None,
    shared_metrics: SharedMetrics | None = None,
) -> Starlette:
    """The tokenwire server.  Pass a ``provider`` (or a whole ``relay``) to override the settings'.

    With ``settings.diagnostics`` the provider is wrapped to serve ``tokenwire doctor``'s
    test streams too (not a ``relay`` passed whole: that one is used as it is).

    ``shared_metrics``: for one of several workers (``tokenwire serve --workers N``), where
    ``/metrics`` adds up the figures of all of them.
    """
    settings = settings or Settings()
    if relay is None:
        provider = provider or settings.create_provider()
        if settings.diagnostics:
            provider = Diagnostics(provider, heartbeat=settings.heartbeat, idle_timeout=settings.idle_timeout)
        relay = Relay(
            provider,
            store=store if store is not None else settings.create_store(),
            options=settings.relay_options(),
        )
    routes = _Routes(relay, settings, shared_metrics)
    app = Starlette(
        routes=routes.table(),
        lifespan=relay.lifespan if shared_metrics is None else _publishing(relay, shared_metrics),
        exception_handlers={
            RequestError: routes.refuse,
            StoreUnavailable: routes.refuse,
            HTTPException: _http_error,
            500: _internal_error,
        },
        middleware=_cors(settings.cors_origin_list()),
    )
    # "/api/stream/" is not "/api/stream": a JSON 404 that names the path, not a 307 to follow.
    app.router.redirect_slashes = False
    app.state.relay = relay
    app.state.settings = settings
    return app


class _Routes:
    """The API's routes, sharing one relay, its settings and the API keys.

    A route refuses a request by raising :class:`RequestError` (or letting the
    store's ``StoreUnavailable`` through): :meth:`refuse` answers it, in JSON.
    """

    def __init__(self, relay: Relay, settings: Settings, shared_metrics: SharedMetrics | None = None) -> None:
        self.relay = relay
        self.settings = settings
        self.shared_metrics = shared_metrics
        self.keys = KeyRing.from_file(settings.auth_keys_file) if settings.auth_keys_file else None
        self.started = int(time.time())  # the models' "created"
        self.index_html = _static("index.html")
        self.client_js = _static("tokenwire.js")
        # tokenwire doctor's test streams, if the server serves them (--diagnostics).
        self.doctor = relay.provider if isinstance(relay.provider, Diagnostics) else None

    def table(self) -> list[Route]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/tokenwire.js", self.client, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/api/stream", self.post_stream, methods=["POST"]),
            Route("/api/stream/{stream_id}", self.get_stream, methods=["GET"]),
            Route("/api/stream/{stream_id}", self.delete_stream, methods=["DELETE"]),
            Route("/api/chat", self.post_chat, methods=["POST"]),
            Route("/api/chat/{chat_id}/stream", self.get_chat_stream, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            *([Route("/api/doctor/{stream_id}", self.doctor_report, methods=["GET"])] if self.doctor else []),
        ]

    async def refuse(self, request: Request, exc: Exception) -> Response:
        error = exc if isinstance(exc, RequestError) else store_unavailable()
        self.relay.metrics.refused[error.error_type] += 1
        return error_response(error)

    def principal_of(self, request: Request) -> str:
        """Who is asking: "" when no keys are configured; raises 401 otherwise."""
        if self.keys is None:
            return ""
        principal = self.keys.principal_for(request.headers.get("authorization"))
        if principal is None:
            raise RequestError(
                401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'", "Authorization"
            )
        return principal

    async def admit(self, principal: str) -> Slot:
        """A place under the stream caps, or 503 / 429."""
        try:
            return await self.relay.reserve(
                principal,
                max_streams=self.settings.max_streams,
                max_per_key=self.settings.max_streams_per_key if self.keys is not None else None,
            )
        except AdmissionRefused as exc:
            if exc.scope == "server":
                raise RequestError(
                    503, "overloaded", "the server is at its stream limit; retry shortly", retryable=True
                ) from None
            raise RequestError(
                429,
                "rate_limited",
                f"this key already has {exc.limit} streams running; wait for one to end or cancel one",
                retryable=True,
            ) from None

    async def post_stream(self, request: Request) -> Response:
        if self.doctor is None:
            meta, _ = await self.start(request)
            return EventStreamResponse(self.relay, meta)
        meta, body = await self.start(request, lambda body: (body, body))
        if meta.model == DOCTOR_MODEL and not Plan.of(parse_stream_request(body).generation).heartbeat:
            # A doctor stream that finds where the proxy chain cuts a quiet connection.
            return EventStreamResponse(self.relay, meta, heartbeat=NO_HEARTBEAT)
        return EventStreamResponse(self.relay, meta)

    async def doctor_report(self, request: Request) -> Response:
        """``GET /api/doctor/{id}``: how far a doctor stream's generation got, and why it stopped.

        Only for the caller's own doctor streams: any other stream is a 404, as one that does not exist.
        """
        assert self.doctor is not None
        meta = await self.relay.get(request.path_params["stream_id"], self.principal_of(request))
        if meta is None or meta.model != DOCTOR_MODEL:
            raise not_found()
        events: list[dict[str, Any]] = []
        after, ended = 0, False
        try:
            while True:  # a read may return part of the log (the Redis store's read batch)
                result = await self.relay.store.read(meta.stream_id, after, timeout=0)
                events += (json.loads(entry[entry.index(b"data: ") + 6 :]) for entry in result.entries)
                ended = result.ended
                if ended or result.next_seq == after:
                    break
                after = result.next_seq
        except LookupError:
            raise not_found() from None
        first = next((read_first_token(e["text"]) for e in events[:3] if e["type"] == "token"), None)
        record = self.doctor.record(first["nonce"]) if first else None
        return JSONResponse(
            {
                "stream_id": meta.stream_id,
                "ended": ended,
                "end": events[-1] if ended else None,
                # This replica's record of the generation (None if it ran on another replica).
                "generation": None if record is None else dataclasses.asdict(record),
            }
        )

    async def start(
        self, request: Request, translate: Callable[[Any], tuple[Any, T]] | None = None
    ) -> tuple[StreamMeta, T | None]:
        """Start the stream a POST asks for; ``translate`` turns another API's body into /api/stream's.

        Returns the stream and what ``translate`` said besides the body.
        """
        relay = self.relay
        principal = self.principal_of(request)
        # Before the body: a request counts toward the caps while its body arrives, and
        # concurrent requests cannot all pass the check before any of them reserves.
        slot = await self.admit(principal)
        extra = None
        try:
            body = await read_json_body(request, self.settings.max_body)
            if translate is not None:
                body, extra = translate(body)
            parsed = parse_stream_request(body)
            model = parsed.generation.model
            if model and not relay.provider.supports_model(model):
                known = ", ".join(relay.provider.model_names() or ())
                raise invalid(f"unknown model {model!r}; the models are: {known}", "model")
            relay.provider.check(parsed.generation)
            key = request.headers.get("idempotency-key")
            if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
                raise invalid(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters", "Idempotency-Key")
        except BaseException:  # a bad request, or a client gone while sending its body
            relay.release(slot)
            raise
        try:
            meta, _created = await relay.start(  # the slot is the generation's, or given back, from here on
                parsed.generation,
                principal=principal,
                resumable=parsed.resumable,
                idempotency_key=key,
                fingerprint=fingerprint_of(body) if key is not None else None,
                slot=slot,
            )
        except IdempotencyConflict:
            raise RequestError(
                422,
                "invalid_request",
                "this Idempotency-Key was used with a different request body; use a new key",
                "Idempotency-Key",
            ) from None
        return meta, extra

    async def post_chat(self, request: Request) -> Response:
        """The AI SDK's ``useChat``: its request, and the stream as UI message chunks."""
        resumable = self.settings.resumable_chats
        meta, chat_id = await self.start(request, lambda body: ai_sdk.translate(body, resumable=resumable))
        assert chat_id is not None
        if meta.resumable:
            await self.relay.bind_chat(meta.principal, chat_id, meta.stream_id)
        return self._chat_response(meta)

    async def get_chat_stream(self, request: Request) -> Response:
        """``useChat({resume: true})`` on mount: the chat's running stream from its start, or 204."""
        principal = self.principal_of(request)
        meta = await self.relay.chat_stream(principal, request.path_params["chat_id"])
        if meta is None:
            return Response(status_code=204)
        try:
            if (await self.relay.store.read(meta.stream_id, 0, timeout=0)).ended:
                return Response(status_code=204)  # finished: the chat has it whole already
        except LookupError:
            pass  # expired or trimmed meanwhile: the response says which, in JSON
        return self._chat_response(meta)

    def _chat_response(self, meta: StreamMeta) -> Response:
        # The message id follows from the stream's, so that a resumed stream names the same message.
        wire = ai_sdk.UIMessageFormat("msg_" + meta.stream_id.removeprefix("str_"))
        return EventStreamResponse(self.relay, meta, headers=AI_SDK_HEADERS, wire=wire)

    async def chat_completions(self, request: Request) -> Response:
        """OpenAI's ``POST /v1/chat/completions``: streamed as chunks, or answered whole."""
        meta, options = await self.start(request, _openai_request)
        assert options is not None
        stream, include_usage = options
        if stream:
            wire = openai_api.ChunkFormat(meta.stream_id, meta.model, include_usage)
            return EventStreamResponse(self.relay, meta, wire=wire)
        created = int(time.time())

        def render(events: list[dict[str, Any]]) -> tuple[int, Any]:
            end = events[-1]
            if end["type"] == "error":
                error = end["error"]
                return ANSWER_ERROR_STATUS.get(error["type"], 500), {"error": error}
            return 200, openai_api.completion(meta.stream_id, meta.model, created, accumulate(events), end)

        return WholeAnswerResponse(self.relay, meta, render)

    async def list_models(self, request: Request) -> Response:
        self.principal_of(request)
        provider = self.relay.provider
        return JSONResponse(openai_api.models(provider.model_names() or [provider.default_model], self.started))

    async def get_stream(self, request: Request) -> Response:
        principal = self.principal_of(request)
        after = parse_cursor(request)
        meta = await self.relay.get(request.path_params["stream_id"], principal)
        if meta is None:
            raise not_found()
        return EventStreamResponse(self.relay, meta, after=after)

    async def delete_stream(self, request: Request) -> Response:
        meta = await self.relay.get(request.path_params["stream_id"], self.principal_of(request))
        if meta is None:
            raise not_found()
        await self.relay.cancel(meta.stream_id)
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        if self.shared_metrics is not None:
            return Response(self.shared_metrics.render(self.relay.metrics), media_type=CONTENT_TYPE_LATEST)
        return Response(self.relay.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(self, request: Request) -> Response:
        # A replica whose store is down can start and resume nothing: a load balancer takes it out.
        relay = self.relay
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT):
                await relay.store.check()
            store_status = "ok"
        except (StoreUnavailable, TimeoutError):
            store_status = "unreachable"
        health: dict[str, Any] = {
            "status": "ok" if store_status == "ok" else "unavailable",
            "store": store_status,
            "provider": relay.provider.name,
            "model": relay.provider.default_model,
            "active_streams": relay.active_streams,  # this process's
        }
        if self.shared_metrics is not None:  # one of several workers: which one answered
            health["worker"] = self.shared_metrics.pid
        return JSONResponse(health, 200 if store_status == "ok" else 503)

    async def index(self, request: Request) -> Response:
        return Response(self.index_html, media_type="text/html; charset=utf-8")

    async def client(self, request: Request) -> Response:
        return Response(
            self.client_js,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": "no-cache"},
        )


def _publishing(relay: Relay, shared: SharedMetrics) -> Callable[[object], contextlib.AbstractAsyncContextManager[None]]:
    """The relay's lifespan, publishing its figures for the other workers meanwhile (:class:`SharedMetrics`)."""

    async def publish() -> None:
        while True:
            shared.publish(relay.metrics)
            await asyncio.sleep(shared.INTERVAL)

    @contextlib.asynccontextmanager
    async def lifespan(app: object = None) -> AsyncIterator[None]:
        async with relay.lifespan(app):
            publisher = asyncio.create_task(publish(), name="metrics publisher")
            try:
                yield
            finally:
                publisher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await publisher
                shared.publish(relay.metrics)  # the last figures, which the other workers go on counting

    return lifespan


def _openai_request(body: Any) -> tuple[Any, tuple[bool, bool]]:
    body, stream, include_usage = openai_api.translate(body)
    return body, (stream, include_usage)


_HTTP_ERROR_TYPES = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error_type = _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(RequestError(exc.status_code, error_type, message, headers=exc.headers))


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The traceback goes to the server log (uvicorn logs it), never to the client.
    return error_response(RequestError(500, "internal_error", "internal server error"))


def _cors(origins: list[str]) -> list[Middleware]:
    """CORS is off unless origins are configured (``--cors-origins https://a.example,https://b.example``)."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["authorization", "content-type", "idempotency-key", "last-event-id"],
            expose_headers=["x-stream-id", "retry-after"],
            max_age=600,
        )
    ]
