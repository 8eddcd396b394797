"""Any OpenAI-compatible ``/chat/completions`` server, streamed.

OpenAI, vLLM, llama.cpp's server, Ollama and LM Studio all speak the same
streaming format: SSE ``data:`` lines, each a ``chat.completion.chunk`` JSON
object, then ``data: [DONE]``.  With ``stream_options.include_usage`` the chunk
before ``[DONE]`` carries ``usage`` and no choices.

Cancellation is the point of this module.  The upstream is reached over
HTTP/1.1 only: closing a partially read HTTP/1.1 response closes its socket,
which is how vLLM, llama.cpp and Ollama learn to stop generating; over HTTP/2
no RST_STREAM is sent and the upstream keeps going (FIELD-GUIDE, httpcore#943).
The response lives in an ``async with`` around every ``await`` and ``yield`` of
:meth:`OpenAIProvider.stream`, so a cancelled task or a closed generator closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from .._events import Finish, FinishReason, ProviderEvent, Reasoning, Token, Usage
from .._exceptions import ProviderError
from .._sse import SSEDecoder
from .base import GenerationRequest, Provider

MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer we read to find its message
MAX_MESSAGE = 500  # characters of an upstream message we pass on
DRAIN_TIMEOUT = 1.0  # seconds we wait for the end of the body after [DONE]


class OpenAIProvider(Provider):
    """Streams from ``{base_url}/chat/completions``, e.g. ``http://127.0.0.1:8080/v1``.

    ``client`` lets the caller share an ``httpx.AsyncClient``; it must not use
    HTTP/2 (see the module docstring) and is not closed by :meth:`aclose`.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.default_model = model or "default"
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._client = client
        self._owns_client = client is None

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIProvider({self.base_url!r}, model={self.default_model!r})"

    async def startup(self) -> None:
        self._get_client()

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http2=False,
                # Only connecting has a deadline here: the relay owns the time
                # limits of a generation (max_duration, cancellation).
                timeout=httpx.Timeout(None, connect=self._connect_timeout),
                # No connection cap: admission is the relay's job, and a hidden
                # pool limit would queue streams without telling anyone.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            )
        return self._client

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = request.stop
        return body

    def _headers(self) -> dict[str, str]:
        headers = {
            "accept": "text/event-stream",
            # A compressed event stream could be buffered by the upstream's encoder.
            "accept-encoding": "identity",
        }
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        return headers

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        client = self._get_client()
        parser = _ChunkParser(self._redact)
        body = self.build_body(request)
        socket = _NewSocket()
        try:
            async with client.stream(
                "POST", self.url, json=body, headers=self._headers(), extensions={"trace": socket.trace}
            ) as response:
                socket.answered = True
                if not response.is_success:
                    raise await self._status_error(response)
                decoder = SSEDecoder()
                async with contextlib.aclosing(response.aiter_bytes()) as chunks:
                    try:
                        async for chunk in chunks:
                            for sse in decoder.decode(chunk):
                                for event in parser.feed(sse.data):
                                    yield event
                                if parser.done:
                                    break
                            if parser.done:
                                # Read the end of the body so that the connection is
                                # pooled; one that stays open is closed instead.
                                with contextlib.suppress(TimeoutError, httpx.HTTPError):
                                    async with asyncio.timeout(DRAIN_TIMEOUT):
                                        async for _ in chunks:
                                            pass
                                break
                    except httpx.TransportError as exc:
                        # After a finish_reason the answer is complete, even if the
                        # connection dropped before [DONE].
                        if parser.finish_reason is None:
                            raise ProviderError(
                                "upstream_error",
                                f"the connection to the upstream was lost mid-stream ({_describe(exc)})",
                                retryable=True,
                            ) from None
        except httpx.ConnectTimeout:
            raise ProviderError(
                "upstream_timeout",
                f"could not connect to the upstream at {self._where()} within {self._connect_timeout:g} s",
                retryable=True,
            ) from None
        except httpx.ConnectError as exc:
            raise ProviderError(
                "upstream_error",
                f"cannot connect to the upstream at {self._where()} ({_describe(exc)}): "
                "is it running? check --base-url",
                retryable=True,
            ) from None
        except httpx.TimeoutException as exc:
            raise ProviderError(
                "upstream_timeout", f"the upstream timed out ({_describe(exc)})", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderError(
                "upstream_error", f"the request to the upstream failed ({_describe(exc)})", retryable=True
            ) from None
        finally:
            await socket.close_unless_answered()
        if not parser.done and parser.finish_reason is None:
            raise ProviderError("upstream_error", "the upstream ended the stream early", retryable=True)
        yield parser.finish()

    async def _status_error(self, response: httpx.Response) -> ProviderError:
        body = bytearray()
        try:
            async with contextlib.aclosing(response.aiter_bytes()) as chunks:
                async for chunk in chunks:
                    body += chunk
                    if len(body) >= MAX_ERROR_BODY:
                        break
        except httpx.HTTPError:
            pass  # the status says enough
        status = response.status_code
        message = self._redact(_error_message(bytes(body[:MAX_ERROR_BODY])))
        text = f"the upstream answered HTTP {status}"
        if status in (401, 403):
            text += " (check the upstream API key: set OPENAI_API_KEY or pass --api-key-env)"
        if message:
            text += f": {message}"
        retry_after = response.headers.get("retry-after")
        if status == 429 and retry_after:
            text += f" (retry after {retry_after[:32]} s)"
        return ProviderError("upstream_error", text, retryable=status == 429 or status >= 500)

    def _where(self) -> str:
        # The base URL without any user:password@ part.
        return str(httpx.URL(self.base_url).copy_with(userinfo=b""))

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text


class _NewSocket:
    """The socket httpcore opens for one request, closed here if the request never got an answer.

    httpcore 1.0.9 keeps a new HTTP/1.1 connection open (in its pool, state NEW,
    never used again) when the request is cancelled between connecting and sending
    its headers: the upstream would hold an idle socket until the pool is closed.
    Once a response exists, closing it closes the socket and this is not needed.
    """

    def __init__(self) -> None:
        self.stream: Any = None
        self.answered = False

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.stream = info.get("return_value")

    async def close_unless_answered(self) -> None:
        if self.stream is not None and not self.answered:
            # Closing a socket httpcore closed already does nothing.
            with contextlib.suppress(Exception):
                await self.stream.aclose()


class _ChunkParser:
    """``data:`` payloads -> provider events, remembering finish_reason and usage."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, data: str) -> list[ProviderEvent]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise _malformed(f"a chunk that is not JSON: {data[:100]!r}") from None
        if not isinstance(chunk, dict):
            raise _malformed(f"a chunk that is not a JSON object: {data[:100]!r}")
        if chunk.get("error") is not None:
            # vLLM and OpenAI report failures after the 200 as a chunk of their own.
            message = self._redact(" ".join((_message_of(chunk) or "no message").split())[:MAX_MESSAGE])
            raise ProviderError(
                "upstream_error", f"the upstream failed mid-stream: {message}", retryable=False
            )
        events: list[ProviderEvent] = []
        choices = chunk.get("choices", [])
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            raise _malformed("a chunk whose 'choices' is not a list")
        if choices:
            choice = choices[0]
            if not isinstance(choice, dict):
                raise _malformed("a chunk whose choices[0] is not an object")
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            if not isinstance(delta, dict):
                raise _malformed("a chunk whose choices[0].delta is not an object")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content")
            for value in (reasoning, content):
                if value is not None and not isinstance(value, str):
                    raise _malformed("a chunk whose delta text is not a string")
            if reasoning:
                events.append(Reasoning(reasoning))
            if content:
                events.append(Token(content))
            reason = choice.get("finish_reason")
            if reason is not None:
                if not isinstance(reason, str):
                    raise _malformed("a chunk whose finish_reason is not a string")
                self.finish_reason = reason
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = _usage(usage)
        return events

    def finish(self) -> Finish:
        # content_filter, tool_calls and the like are, for a token stream, a stop.
        reason: FinishReason = "length" if self.finish_reason == "length" else "stop"
        return Finish(reason, self.usage)


def _usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        raise _malformed("a chunk whose 'usage' is not an object")
    completion = usage.get("completion_tokens")
    prompt = usage.get("prompt_tokens")
    for value in (completion, prompt):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise _malformed("a chunk whose usage counts are not integers")
    if completion is None:
        return None  # the relay counts the tokens itself
    return Usage(completion_tokens=completion, prompt_tokens=prompt)


def _malformed(what: str) -> ProviderError:
    return ProviderError("upstream_error", f"the upstream sent {what}", retryable=False)


def _error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI/llama.cpp ``{"error": {"message"}}``,
    vLLM ``{"message"}``, Ollama ``{"error": "..."}``, or the body's text."""
    try:
        message = _message_of(json.loads(body))
    except ValueError:
        message = None
    if message is None:
        message = body.decode("utf-8", "replace")
    message = " ".join(message.split())
    return message[:MAX_MESSAGE]


def _message_of(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    if isinstance(payload.get("message"), str):
        return payload["message"]
    return None


def _describe(exc: BaseException) -> str:
    # httpx's ReadError for a reset connection has no text of its own: ask its causes.
    cause: BaseException | None = exc
    while cause is not None:
        if str(cause):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__
