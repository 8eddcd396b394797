"""Server-Sent Events: the few bytes we write, and an incremental WHATWG decoder.

The decoder follows the HTML standard, section 9.2.6 "Interpreting an event
stream", in full, as three small layers that each take chunks and return what
they completed::

    bytes --TextDecoder--> text --LineDecoder--> lines --EventDecoder--> ServerSentEvent

``SSEDecoder`` runs the same algorithm with the first two layers fused, for
speed: it finds line ends in the bytes, keeps an unterminated line as bytes, and
decodes each run of complete lines in one call; ``EventDecoder.decode_lines``
then takes all of a chunk's lines in one call, with fast paths for the
``data: ``, ``id: `` and blank lines that most streams are made of.
tests/test_sse.py checks ``SSEDecoder`` against the three layers on random input.

Spec points that decide behaviour are quoted where they apply.  One deliberate
addition: a dispatched event carries ``retry``, the reconnection time set by the
last valid ``retry`` field seen so far (``None`` if none), because a ``retry``
field alone in a block dispatches nothing and a fetch-based client still needs it.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# The comments we send are single lines with no blank line after them: they join the
# block of the event that follows.  "If the line is empty (a blank line): dispatch the
# event", and the spec dispatches nothing for an empty data buffer, but lenient parsers
# do: httpx-sse once it has seen an ``id`` or a ``retry``, fetch-event-source for every
# blank line.  Code that parses each event's data as JSON then fails on "".
#: A heartbeat, written after ``heartbeat`` seconds of silence, between events.
KEEPALIVE = b": keepalive\n"
#: A stream's first bytes: a comment, which flushes the headers through any proxy
#: and which every parser skips.  (A block holding only ``retry:`` is dispatched by
#: lenient parsers as an event with empty data: ``retry:`` goes out with the first event.)
OPENING = b": stream\n"
_LINE_END = re.compile("\r\n|\r|\n")


def encode_retry(milliseconds: int) -> bytes:
    """A ``retry:`` field, sent in the same block as a stream's first event."""
    return b"retry: %d\n" % milliseconds


@dataclass(slots=True)  # not frozen: one per upstream token, and frozen sets fields via object.__setattr__
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str = ""
    retry: int | None = None


class TextDecoder:
    """UTF-8, incrementally: a character split across chunks waits for its end.

    "Event streams are always decoded as UTF-8 ... One leading U+FEFF BYTE ORDER
    MARK character must be ignored if any are present" and invalid bytes become
    U+FFFD (the "decode" algorithm with replacement).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True

    def decode(self, chunk: bytes) -> str:
        text = self._decoder.decode(chunk)
        return self._strip_bom(text)

    def flush(self) -> str:
        return self._strip_bom(self._decoder.decode(b"", final=True))

    def _strip_bom(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            if text[0] == "\ufeff":
                return text[1:]
        return text


class LineDecoder:
    """Splits text into lines at CRLF, LF or CR, and nothing else.

    "end-of-line = ( cr lf / cr / lf )".  U+2028, U+0085 and friends are not
    line ends (unlike ``str.splitlines``).  A CR at the end of a chunk ends a line
    at once; an LF at the start of the next chunk is then its partner, not a
    blank line.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._skip_lf = False

    def decode(self, text: str) -> list[str]:
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        if not text:
            return []
        buffer = self._buffer + text
        if "\r" not in text:
            # Fast path: most streams use LF only.
            lines = buffer.split("\n")
        else:
            lines = _LINE_END.split(buffer)
            # A CR that ends the chunk ends its line; an LF that starts the next is its partner.
            self._skip_lf = buffer[-1] == "\r"
        self._buffer = lines.pop()
        return lines

    def flush(self) -> list[str]:
        # "Once the end of the file is reached, any pending data must be
        # discarded": an unterminated last line is not a line.
        self._buffer = ""
        return []


class EventDecoder:
    """Turns lines into events: fields, comments, dispatch on a blank line."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self._last_event_id = ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        return self._retry

    def decode(self, line: str) -> ServerSentEvent | None:
        """One line, without its line end: the event it dispatches, if any."""
        events = self.decode_lines([line])
        return events[0] if events else None

    def decode_lines(self, lines: list[str]) -> list[ServerSentEvent]:
        """``decode`` for each line in turn, in one call: the events they complete."""
        events = []
        data = self._data
        for line in lines:
            # Fast paths for the lines most streams are made of ("data: ", blank, "id: "),
            # the value's one leading space already removed; any other line goes to _field.
            if line[:6] == "data: ":
                data.append(line[6:])
            elif not line:
                # "If the data buffer is an empty string, set the data buffer and the
                # event type buffer to the empty string and return."
                if data:
                    # (event, data, id, retry), positional: this runs per event, and keywords bind slower.
                    events.append(
                        ServerSentEvent(
                            self._event or "message", "\n".join(data), self._last_event_id, self._retry
                        )
                    )
                    data = self._data = []
                self._event = ""
            elif line[:4] == "id: ":
                if "\x00" not in line:  # "If the field value does not contain U+0000 NULL"
                    self._last_event_id = line[4:]
            else:
                self._field(line)
        return events

    def reset_event(self) -> None:
        """Discard a half-received event (the connection ended inside it)."""
        self._data = []
        self._event = ""

    def _field(self, line: str) -> None:
        if line[0] == ":":
            return  # "If the line starts with a U+003A COLON character (:) Ignore the line."
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]  # "If value starts with a U+0020 SPACE character, remove it"
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\x00" not in value:  # "If the field value does not contain U+0000 NULL"
                self._last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # "Otherwise: The field is ignored."


class SSEDecoder:
    """bytes -> events, for any chunking of the input."""

    def __init__(self) -> None:
        self._events = EventDecoder()
        self._at_start = True
        self._pending: list[bytes] = []  # the unterminated last line, as it arrived
        self._skip_lf = False

    @property
    def last_event_id(self) -> str:
        return self._events.last_event_id

    @property
    def retry(self) -> int | None:
        return self._events.retry

    def decode(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._at_start:
            # "One leading U+FEFF BYTE ORDER MARK character must be ignored": wait for
            # three bytes, or fewer that cannot begin one.
            chunk = b"".join(self._pending) + chunk
            if len(chunk) < len(codecs.BOM_UTF8) and codecs.BOM_UTF8.startswith(chunk):
                self._pending = [chunk] if chunk else []
                return []
            self._at_start = False
            self._pending = []
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            # A CR that ends the chunk ends its line; an LF that starts the next is its partner.
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n")
        if end < 0:  # still inside a line
            if chunk:
                self._pending.append(chunk)
            return []
        # Line ends are ASCII, which UTF-8 never uses inside a character and the
        # replacement of invalid bytes never swallows: text decoded a run of complete
        # lines at a time is the text of the whole stream, split.
        if self._pending:
            # The line that completes the pending bytes is decoded on its own: it may be
            # long (a large event, over many reads), and need not be split again.
            first = chunk.find(b"\n")
            self._pending.append(chunk[:first])
            lines = [b"".join(self._pending).decode("utf-8", "replace")]
            if first < end:
                lines += chunk[first + 1 : end].decode("utf-8", "replace").split("\n")
        else:
            lines = chunk[:end].decode("utf-8", "replace").split("\n")
        self._pending = [chunk[end + 1 :]] if end + 1 < len(chunk) else []
        return self._events.decode_lines(lines)

    def flush(self) -> list[ServerSentEvent]:
        """End of the stream: what completes now; the unterminated tail is discarded.

        Afterwards the decoder is ready for a new connection, keeping only the
        last event id and the reconnection time, as an EventSource does.
        """
        # "Once the end of the file is reached, any pending data must be discarded":
        # an unterminated last line is not a line, so nothing completes.
        self._at_start = True
        self._pending = []
        self._skip_lf = False
        self._events.reset_event()
        return []
