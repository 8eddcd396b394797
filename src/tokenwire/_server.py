"""The HTTP server ``tokenwire serve`` runs: uvicorn, set up in this one place.

Why this module exists: a request that uvicorn cannot parse never reaches the
app.  uvicorn answers it itself, with ``400 Invalid HTTP request received.`` in
text/plain, while every other error of this API is JSON that says what to fix
(``{"error": {"type": "invalid_request", "message": ...}}``) and clients parse
it as such.  :class:`HttpProtocol` answers those requests in JSON too.

Limits that belong to the connection rather than to a route (the request
target's length here; a header deadline and a header-size cap to come) go in
this module as well, and :func:`create_config` is the only place that builds
the server's configuration, so that ``serve()`` and the tests run the same one.

What uvicorn's httptools protocol refuses (the one ``uvicorn[standard]``
picks; we name it, so h11 is never used), all through ``send_400_response``:

* llhttp refuses a byte that may not appear in a request target (anything
  not ASCII, a space, a control character): ``HttpParserInvalidURLError``.
* ``httptools.parse_url``, which uvicorn calls once the headers are in, fails
  on a target over 65535 bytes (its offsets are 16-bit), after uvicorn has
  buffered all of it however long: we refuse such a target while it arrives.
* anything else llhttp cannot parse (a bad method, header, version...).
"""

from __future__ import annotations

import asyncio
import json
import sys

import httptools
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ._config import Settings
from ._validation import RequestError

#: The longest request target (path and query) we read: the most httptools can parse.
MAX_TARGET_BYTES = 65535
#: How long a refused client may go on sending (all of it dropped) before we close (see _close_gently).
LINGER_SECONDS = 5.0


class _TargetTooLong(Exception):
    """Raised from the parser's on_url callback; httptools hands it back as the context of its error."""


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, whose answer to a malformed request is a JSON error that says why."""

    _lingering: asyncio.TimerHandle | None = None  # set once refused: what arrives then is dropped

    def data_received(self, data: bytes) -> None:
        if self._lingering is None:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        # Refused as soon as it is over the limit: uvicorn alone would buffer a
        # target of any length, then fail on it in parse_url.  RFC 9112, 3: "A
        # server that receives a request-target longer than any URI it wishes to
        # parse MUST respond with a 414 (URI Too Long) status code".
        if len(self.url) > MAX_TARGET_BYTES:
            raise _TargetTooLong

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its `except httptools.HttpParserError` in
        # data_received, the only place it does: the exception being handled
        # says what was wrong (``msg`` is always "Invalid HTTP request received.").
        error = _describe(sys.exception())
        # Encoded as the app's JSONResponse encodes.
        content = json.dumps(error.to_dict(), ensure_ascii=False, separators=(",", ":")).encode()
        head = [STATUS_LINE[error.status]]
        for name, value in self.server_state.default_headers:  # date, server
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(content),
            b"connection: close\r\n",  # the parser cannot go on after an error: nor can the connection
            b"\r\n",
        ]
        self.transport.write(b"".join(head) + content)
        self._close_gently()

    def _close_gently(self) -> None:
        # RFC 9112, 9.6: closing with the rest of the request unread makes the
        # kernel reset the connection, and "the reset packet might erase the
        # client's unacknowledged input buffers", our answer in them, before a
        # client that sends its whole request first has read it.  So: half-close,
        # drop what still arrives, close when the client does or after a while.
        if self.transport.can_write_eof() and (self.cycle is None or self.cycle.response_complete):
            self.transport.write_eof()
            self._lingering = self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:  # TLS cannot half-close; a response still being sent (pipelining) cannot write after EOF
            self.transport.close()


def _describe(exc: BaseException | None) -> RequestError:
    """The JSON error for a request the parser refused with ``exc``."""
    if isinstance(exc, httptools.HttpParserCallbackError):  # raised by one of uvicorn's callbacks (or ours)
        cause = exc.__context__
        if isinstance(cause, _TargetTooLong):
            return RequestError(
                414,
                "invalid_request",
                f"the request target (path and query) is longer than {MAX_TARGET_BYTES} bytes; "
                "send a shorter URL (stream ids are a few dozen characters)",
            )
        if cause is not None:
            return _invalid(f"the request could not be parsed: {cause}")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return _invalid(
            "the request target holds a byte that is not allowed in a URL (anything not ASCII, a space "
            f"or a control character; the parser says: {exc}): percent-encode it, e.g. é as %C3%A9"
        )
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return _invalid("the request line does not start with an HTTP method such as GET or POST")
    if exc is not None:
        return _invalid(f"the request is not valid HTTP/1.1 (the parser says: {exc})")
    return _invalid("the request is not valid HTTP/1.1")


def _invalid(message: str) -> RequestError:
    return RequestError(400, "invalid_request", message)


def create_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The configuration of the uvicorn server that serves ``app`` as ``settings`` say."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=3,
        http=HttpProtocol,
    )
