"""``tokenwire doctor URL``: why a deployed stream arrives all at once, or dies when it goes quiet.

The doctor runs test streams through the URL a browser uses and judges what arrives.
Against a tokenwire server started with ``--diagnostics`` it asks for the
``tokenwire-doctor`` model's streams (``providers/doctor.py``), whose every token
carries the time the server sent it, and so it can tell:

- **headers**: what the client receives, and which hops the headers name;
- **buffering**: each event's arrival against its send time: on time, held until the
  end, or released in batches of some size;
- **compression**: whether ``text/event-stream`` arrived encoded, and if it still
  arrived event by event;
- **cancellation**: after an abort, whether the server saw the client leave and when
  it stopped the generation (``GET <stream URL>/../doctor/{id}``);
- **resume**: whether ``Last-Event-ID`` reaches the server through the hops;
- **idle** (``--idle SECONDS``): whether a stream silent for that long survives, with
  the server's heartbeats and without them.

Against any other SSE endpoint (or tokenwire without ``--diagnostics``) only what the
client sees can be judged -- headers, the arrival pattern, compression -- and the
report says so.  Each failed check names the settings that fix it, per kind of hop:
the nginx ones are checked by the tests (real nginx), the others are marked unverified.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import textwrap
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ._sse import SSEDecoder
from .providers.doctor import DOCTOR_MODEL, read_first_token

try:
    import brotli
except ImportError:  # the doctor extra: without it a br-encoded stream is reported, not read
    brotli = None

# -- what is measured ------------------------------------------------------------

#: The main test stream: long enough to see a 4 KiB or 8 KiB buffer fill a few times.
EVENTS = 80
INTERVAL_MS = 40
SIZE = 96
WIDTH = 110  # the text report's lines
#: What a browser asks for, as far as this doctor can decode it.
ACCEPT_ENCODING = "gzip, deflate, br" if brotli is not None else "gzip, deflate"
BURST_GAP = 0.010  # s: events further apart than this arrived separately
CANCEL_WAIT = 3.0  # s after the abort for the server to stop the generation
DEFAULT_BODY = {"messages": [{"role": "user", "content": "Count from 1 to 40, one number per line."}]}


@dataclass(slots=True)
class Fix:
    hop: str
    setting: str
    verified: bool = False  # checked against the real hop by tokenwire's tests


@dataclass(slots=True)
class Check:
    name: str
    status: str  # "pass", "warn", "fail" or "skip"
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    fixes: list[Fix] = field(default_factory=list)


@dataclass(slots=True)
class Report:
    url: str
    server: str  # "tokenwire", "tokenwire without --diagnostics", "not tokenwire"
    note: str  # what the server kind means for the checks
    hops: list[str]
    checks: list[Check]

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if check.status == "fail"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": not self.failed}

    def render(self) -> str:
        lines = [f"tokenwire doctor: {self.url}", f"server: {self.server}; {self.note}"]
        lines.append("hops seen: " + ("; ".join(self.hops) if self.hops else "none named in the headers"))
        lines.append("")
        for check in self.checks:
            lines += textwrap.wrap(f"{check.status.upper():<5} {check.name:<13} {check.summary}", WIDTH,
                                   subsequent_indent=" " * 20, break_on_hyphens=False)  # fmt: skip
            for fix in check.fixes:
                mark = "" if fix.verified else " (unverified)"
                lines += textwrap.wrap(f"fix {fix.hop}{mark}: {fix.setting}", WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 10, break_on_hyphens=False)  # fmt: skip
        lines.append("")
        failed = len(self.failed)
        lines.append(f"{failed} check{'s' if failed != 1 else ''} failed." if failed else "No check failed.")
        return "\n".join(lines)


# -- the fixes, per problem and hop ------------------------------------------------
# nginx's (and tokenwire's) are exercised by tests/test_doctor.py against real nginx; the others
# come from each product's documentation (read in November 2026) and are not checked here.

FIXES: dict[str, list[Fix]] = {
    "buffering": [
        Fix("nginx", "proxy_buffering off; in the stream's location, or stop overriding tokenwire's "
            "X-Accel-Buffering: no (remove proxy_ignore_headers X-Accel-Buffering)", True),
        Fix("Caddy", "reverse_proxy flushes text/event-stream at once by itself; if events still batch, look "
            "at encode (compression)"),
        Fix("Cloudflare", "no Cache Rule (Cache Everything) and no response body buffering rule on the stream "
            "path; a Worker must return the upstream body as a stream (new Response(upstream.body, upstream)), "
            "never await its text()"),
        Fix("Vercel", "stream from an App Router route handler returning a ReadableStream (Pages Router API "
            "routes do not stream), or rewrite the path to the tokenwire origin"),
        Fix("AWS CloudFront", "the managed CachingDisabled cache policy on the stream path's behavior, with POST "
            "allowed"),
    ],
    "compression": [
        Fix("nginx", "gzip off; in the stream's location, or remove text/event-stream from gzip_types", True),
        Fix("Caddy", "keep the stream out of encode, whose default match includes text/*: "
            "@compress not path /api/stream*, then encode @compress"),
        Fix("Cloudflare", "a Compression Rule for media type text/event-stream that disables compression; "
            "check that no hop removes tokenwire's Cache-Control: no-transform"),
        Fix("Vercel", "its CDN compresses whatever the client accepts; have the stream request send "
            "Accept-Encoding: identity"),
        Fix("AWS CloudFront", "Compress objects automatically: No on the stream path's behavior"),
    ],
    "idle": [
        Fix("tokenwire", "--heartbeat below the shortest idle timeout of the chain", True),
        Fix("nginx", "proxy_read_timeout above tokenwire's --heartbeat (nginx's default is 60s)", True),
        Fix("Caddy", "nothing cuts a quiet stream by default; a transport read_timeout, stream_timeout or "
            "timeouts { write } someone set must be longer than --heartbeat"),
        Fix("Cloudflare", "a proxied request is cut after 100 s (120 s in current documentation) without a "
            "byte from the origin, as error 524: keep --heartbeat well below"),
        Fix("AWS ALB", "the idle_timeout.timeout_seconds attribute (default 60) above --heartbeat"),
        Fix("AWS CloudFront", "the origin's response timeout (default 30 s, counted between packets too) above "
            "--heartbeat"),
        Fix("Vercel", "a function's stream ends at its maxDuration: raise it (export const maxDuration), or "
            "rewrite to the tokenwire origin"),
    ],
    "cancellation": [
        Fix("nginx", "remove proxy_ignore_client_abort on; (the default, off, closes the upstream connection "
            "when the client leaves)", True),
        Fix("Caddy", "2.9.0 or later, without flush_interval -1 (2.6 to 2.8 with it kept the upstream running)"),
        Fix("Cloudflare", "a Worker: the enable_request_signal flag, and request.signal passed to the upstream "
            "fetch"),
        Fix("Vercel", "\"supportsCancellation\": true for the function in vercel.json, and request.signal "
            "passed upstream"),
        Fix("tokenwire", "where the chain cannot pass the abort on, have the client send "
            "DELETE /api/stream/{id} on Stop (tokenwire.js does for resumable streams)", True),
    ],
    "resume": [
        Fix("nginx", "do not clear or override the header: remove proxy_set_header Last-Event-ID", True),
        Fix("Caddy", "no header_up that deletes Last-Event-ID (header_up -Last-Event-ID, -Last-*, -*)"),
        Fix("AWS CloudFront", "an origin request policy whose headers include Last-Event-ID (or AllViewer)"),
        Fix("Cloudflare", "no Transform Rule that removes Last-Event-ID; a Worker forwards the request's "
            "headers"),
    ],
    "headers": [
        Fix("nginx", "no proxy_hide_header or add_header for Content-Type or Cache-Control on the stream "
            "path", True),
        Fix("any hop", "pass Content-Type: text/event-stream and Cache-Control: no-cache, no-transform through "
            "unchanged"),
    ],
}

HOP_HEADERS = {
    "cf-ray": "Cloudflare",
    "x-amz-cf-id": "AWS CloudFront",
    "x-amz-cf-pop": "AWS CloudFront",
    "x-vercel-id": "Vercel",
    "x-vercel-cache": "Vercel",
    "fly-request-id": "Fly.io",
    "x-served-by": "Fastly (or Varnish)",
    "x-azure-ref": "Azure Front Door",
    "x-envoy-upstream-service-time": "Envoy",
}
SERVER_NAMES = {"nginx": "nginx", "cloudflare": "Cloudflare", "caddy": "Caddy", "awselb": "AWS ALB",
                "vercel": "Vercel", "envoy": "Envoy"}  # fmt: skip


# -- one test stream, as it arrives ----------------------------------------------


@dataclass(slots=True)
class Arrived:
    at: float  # s after the request was sent
    id: str
    data: str
    offset: int  # decoded bytes received up to and including this event


@dataclass(slots=True)
class Capture:
    """One request's answer: its head, and when each network read and each event arrived."""

    status: int = 0
    http_version: str = ""
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    headers_at: float | None = None
    reads: list[tuple[float, int]] = field(default_factory=list)  # (s after the request, wire bytes)
    events: list[Arrived] = field(default_factory=list)
    keepalives: list[float] = field(default_factory=list)
    body: bytes = b""  # the start of a body that is not an event stream
    ended: str = ""  # "end" (the server ended it), "abort" (we did), "cut", "timeout", "unreadable"
    ended_at: float = 0.0
    error: str = ""

    @property
    def is_event_stream(self) -> bool:
        return self.status == 200 and self.headers.get("content-type", "").startswith("text/event-stream")

    @property
    def terminal(self) -> dict[str, Any] | None:
        """The tokenwire ``done`` or ``error`` event, if it arrived."""
        for event in reversed(self.events[-2:]):
            parsed = _json(event.data)
            if isinstance(parsed, dict) and parsed.get("type") in ("done", "error"):
                return parsed
        return None

    def stamped(self) -> tuple[dict[str, Any] | None, list[tuple[int, float, Arrived]]]:
        """A doctor stream's header, and its events as ``(k, sent, arrival)``."""
        header, points = None, []
        for event in self.events:
            parsed = _json(event.data)
            if not isinstance(parsed, dict) or parsed.get("type") != "token":
                continue
            text = parsed.get("text", "")
            info = read_first_token(text)
            if info is not None:
                header = info
                continue
            try:
                k, sent = text.split(" ", 2)[:2]
                points.append((int(k), float(sent), event))
            except ValueError:
                continue  # not a doctor stream's token
        return header, points


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class _Decoder:
    """A ``Content-Encoding``'s bytes back to the stream's, chunk by chunk (``None``: cannot)."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._decompress: Callable[[bytes], bytes] | None
        if encoding in ("", "identity"):
            self._decompress = bytes
        elif encoding in ("gzip", "x-gzip", "deflate"):
            self._decompress = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress  # gzip or zlib header
        elif encoding == "br" and brotli is not None:
            self._decompress = brotli.Decompressor().process
        else:
            self._decompress = None

    @property
    def works(self) -> bool:
        return self._decompress is not None

    def __call__(self, chunk: bytes) -> bytes:
        assert self._decompress is not None
        return self._decompress(chunk)


async def capture(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str],
    body: Any = None,
    until: Callable[[Capture], bool] | None = None,
    abort_after: float | None = None,
    max_time: float = 30.0,
) -> Capture:
    """Send one request and record its answer.

    It stops reading (an abort: the connection is closed) once ``until(capture)`` is
    true after a read, or ``abort_after`` seconds after the answer's headers.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    got = Capture()
    request_headers = {"accept": "text/event-stream", "accept-encoding": ACCEPT_ENCODING, **headers}
    try:
        async with asyncio.timeout(max_time):
            async with client.stream(method, url, headers=request_headers, json=body) as response:
                got.headers_at = loop.time() - started
                got.status, got.http_version, got.headers = (
                    response.status_code, response.http_version, response.headers
                )  # fmt: skip
                if not got.is_event_stream:
                    async for chunk in response.aiter_bytes():  # an error's JSON, a page: its start
                        got.body += chunk
                        if len(got.body) > 65536:
                            break
                    got.ended, got.ended_at = "end", loop.time() - started
                    return got
                try:
                    async with asyncio.timeout(abort_after):
                        got.ended = await _read_events(response, got, started, until)
                except TimeoutError:
                    got.ended = "abort"
                if got.ended == "abort":
                    got.ended_at = loop.time() - started
                    return got  # leaving the block closes the connection
    except TimeoutError:
        got.ended, got.error = "timeout", f"still open after {max_time:g} s"
    except httpx.HTTPError as exc:
        got.ended, got.error = "cut", f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    got.ended_at = loop.time() - started
    return got


async def _read_events(
    response: httpx.Response, got: Capture, started: float, until: Callable[[Capture], bool] | None
) -> str:
    """Record the event stream's reads and events; how it ended: "end", "abort" or "unreadable"."""
    loop = asyncio.get_running_loop()
    decode = _Decoder(response.headers.get("content-encoding", "").strip().lower())
    sse = SSEDecoder()
    received = 0
    async for chunk in response.aiter_raw():
        at = loop.time() - started
        got.reads.append((at, len(chunk)))
        if not decode.works:
            continue
        data = decode(chunk)
        got.keepalives += [at] * data.count(b": keepalive")
        received += len(data)
        for event in sse.decode(data):
            got.events.append(Arrived(at, event.id, event.data, received))
        if until is not None and until(got):
            return "abort"
    return "end" if decode.works else "unreadable"


# -- the judgements ------------------------------------------------------------------


def _size(nbytes: float) -> str:
    return f"{nbytes / 1024:.0f} KiB" if nbytes >= 1024 else f"{nbytes:.0f} bytes"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _bursts(events: list[Arrived]) -> list[list[Arrived]]:
    bursts: list[list[Arrived]] = []
    for event in events:
        if bursts and event.at - bursts[-1][-1].at <= BURST_GAP:
            bursts[-1].append(event)
        else:
            bursts.append([event])
    return bursts


def hops_of(headers: httpx.Headers) -> list[str]:
    """The hops the answer's headers name, with the header that names each."""
    hops = []
    server = headers.get("server", "")
    for word, name in SERVER_NAMES.items():
        if word in server.lower():
            hops.append(f"{name} (Server: {server})")
            break
    if via := headers.get("via"):
        hops.append(f"Via: {via}")
    for header, name in HOP_HEADERS.items():
        if value := headers.get(header):
            hops.append(f"{name} ({header}: {value})")
    return hops


def check_headers(got: Capture, *, tokenwire: bool) -> Check:
    h = got.headers
    evidence = {
        "status": got.status,
        "http_version": got.http_version,
        "content_type": h.get("content-type"),
        "cache_control": h.get("cache-control"),
        "content_encoding": h.get("content-encoding"),
        "transfer_encoding": h.get("transfer-encoding"),
        "content_length": h.get("content-length"),
        "x_accel_buffering": h.get("x-accel-buffering"),
        "seconds_to_headers": round(got.headers_at or 0.0, 4),
    }
    notes = [h.get("content-type", "no content-type")]
    status, problems = "pass", []
    if not got.is_event_stream:
        status = "fail"
        problems.append(f"the answer is {got.status} {h.get('content-type', 'without a content-type')}, not an event "
                        "stream")  # fmt: skip
    cache = h.get("cache-control", "")
    notes.append(f"cache-control {cache!r}" if cache else "no cache-control")
    if "no-cache" not in cache and "no-store" not in cache:
        status = "fail" if status == "fail" else "warn"
        problems.append("no Cache-Control: no-cache (a cache may hold or replay the stream)")
    elif tokenwire and "no-transform" not in cache:
        status = "fail" if status == "fail" else "warn"
        problems.append("a hop replaced tokenwire's Cache-Control: no-cache, no-transform")
    notes.append(f"{h['content-encoding']}-encoded" if h.get("content-encoding") else "not compressed")
    if h.get("content-length") and got.is_event_stream:
        notes.append(f"content-length {h['content-length']} (a hop had the whole body before it answered)")
    else:
        notes.append(f"transfer-encoding {h['transfer-encoding']}" if h.get("transfer-encoding") else "no framing "
                     "header (HTTP/2, or the body ends with the connection)")  # fmt: skip
    notes.append(got.http_version)
    if tokenwire and not h.get("x-accel-buffering"):
        notes.append("X-Accel-Buffering: no was removed on the way (a hop read it; nginx does)")
    summary = "; ".join(notes)
    if problems:
        summary = "; ".join(problems) + " -- " + summary
    return Check("headers", status, summary, evidence, FIXES["headers"] if status != "pass" else [])


def check_buffering(got: Capture, points: list[tuple[int, float, Arrived]], interval: float) -> Check:
    """Arrival against send time, for a stream whose events carry their send times."""
    if len(points) < 2:
        return Check("buffering", "fail", f"only {len(points)} test events arrived ({got.ended}"
                     f"{': ' + got.error if got.error else ''})", {"events": len(points)})  # fmt: skip
    lags = [arrived.at - sent for _, sent, arrived in points]
    base = min(lags)
    late = [lag - base for lag in lags]
    arrivals = [arrived for _, _, arrived in points]
    bursts = _bursts(arrivals)
    evidence: dict[str, Any] = {
        "events": len(points),
        "seconds_to_first_byte": round(got.reads[0][0], 4) if got.reads else None,
        "seconds_to_first_event": round(arrivals[0].at, 4),
        "lag_p50_ms": round(statistics.median(late) * 1000, 2),
        "lag_max_ms": round(max(late) * 1000, 2),
        "send_span_s": round(points[-1][1] - points[0][1], 4),
        # The gaps between two events as sent, and as they arrived.
        "gap_sent_median_ms": round(statistics.median(b[1] - a[1] for a, b in zip(points, points[1:])) * 1000, 2),
        "gap_arrived_median_ms": round(
            statistics.median(b.at - a.at for a, b in zip(arrivals, arrivals[1:])) * 1000, 2
        ),
        "arrival_span_s": round(arrivals[-1].at - arrivals[0].at, 4),
        "batches": len(bursts),
    }
    if max(late) <= max(0.2, 3 * interval):
        summary = (f"{len(points)} events arrived as they were sent: {_ms(statistics.median(late))} late at the "
                   f"median, {_ms(max(late))} at most (first byte after {_ms(got.reads[0][0])}, first event "
                   f"after {_ms(arrivals[0].at)})")  # fmt: skip
        return Check("buffering", "pass", summary, evidence)
    biggest = max(bursts, key=len)
    if len(biggest) >= 0.8 * len(points):
        spread = biggest[-1].at - biggest[0].at
        held = max(late)
        summary = (f"all {len(points)} events arrived within {_ms(spread)}, {held:.1f} s after the first was "
                   "sent: a hop buffers the whole response")  # fmt: skip
        if len(biggest) < len(points):
            summary = f"{len(biggest)} of " + summary.removeprefix("all ")
        evidence["buffered"] = "whole response"
        return Check("buffering", "fail", summary, evidence, FIXES["buffering"])
    # Batches: what a batch held, in the stream's own (decoded) bytes.
    sizes, previous = [], 0
    for burst in bursts:
        sizes.append(burst[-1].offset - previous)
        previous = burst[-1].offset
    typical = statistics.median(sizes[:-1] or sizes)  # the last batch is what was left at the end
    evidence["buffered"] = "batches"
    evidence["batch_bytes_median"] = typical
    summary = (f"events arrive in {len(bursts)} batches of about {_size(typical)}, up to {max(late):.1f} s after "
               f"they were sent: a hop buffers {_size(typical)}")  # fmt: skip
    return Check("buffering", "fail", summary, evidence, FIXES["buffering"])


def check_arrivals(got: Capture) -> Check:
    """The arrival pattern alone, for a stream whose send times are unknown."""
    events = got.events
    if len(events) < 3:
        return Check("buffering", "skip", f"too few events to judge ({len(events)})", {"events": len(events)})
    bursts = _bursts(events)
    span = events[-1].at - events[0].at
    evidence = {"events": len(events), "seconds_to_first_event": round(events[0].at, 4),
                "arrival_span_s": round(span, 4), "batches": len(bursts)}  # fmt: skip
    if len(bursts) == 1 and events[0].at > 0.5:
        summary = (f"all {len(events)} events arrived within {_ms(span)}, {events[0].at:.1f} s after the request: "
                   "a hop may buffer the whole response, or the server sent it at once (a tokenwire server "
                   "with --diagnostics stamps its send times, which tells the two apart)")  # fmt: skip
        return Check("buffering", "warn", summary, evidence, FIXES["buffering"])
    summary = f"{len(events)} events arrived over {_ms(span)}, in {len(bursts)} separate batches"
    return Check("buffering", "pass", summary, evidence)


def check_compression(got: Capture, buffering: Check) -> Check:
    encoding = got.headers.get("content-encoding", "").strip().lower()
    evidence = {"content_encoding": encoding or None, "wire_bytes": sum(n for _, n in got.reads),
                "decoded_bytes": got.events[-1].offset if got.events else 0}  # fmt: skip
    if not encoding or encoding == "identity":
        return Check("compression", "pass", "not compressed", evidence)
    if got.ended == "unreadable":
        return Check("compression", "warn", f"arrived {encoding}-encoded, which this doctor cannot decode "
                     "(for br: pip install brotli)", evidence, FIXES["compression"])  # fmt: skip
    if buffering.status == "pass":
        return Check("compression", "warn", f"arrived {encoding}-encoded, and still event by event (the hop "
                     "flushes its compressor per write; a hop that stops flushing would batch the stream)",
                     evidence, FIXES["compression"])  # fmt: skip
    if buffering.status == "skip":
        return Check("compression", "warn", f"arrived {encoding}-encoded", evidence, FIXES["compression"])
    return Check("compression", "fail", f"arrived {encoding}-encoded and not event by event: a compressor "
                 "holds events until its buffer fills", evidence, FIXES["compression"])  # fmt: skip


# -- the doctor ------------------------------------------------------------------------


def _sibling(url: str, *segments: str) -> str:
    """``url`` with its last path segment replaced (``…/api/stream`` -> ``…/api/doctor/{id}``)."""
    parts = urlsplit(url)
    parent = parts.path.rstrip("/").rsplit("/", 1)[0]
    return urlunsplit(parts._replace(path="/".join([parent, *segments]), query=""))


def _below(url: str, *segments: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *segments]), query=""))


def doctor_body(extra: Mapping[str, Any] | None, **plan: Any) -> dict[str, Any]:
    plan = {"nonce": secrets.token_hex(8), **plan}
    body = {**(extra or {}), "model": DOCTOR_MODEL,
            "messages": [{"role": "user", "content": json.dumps(plan)}]}  # fmt: skip
    return body


class DoctorError(Exception):
    """The doctor cannot run at all (unreachable, refused); the message says what to do."""


class Doctor:
    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        idle: float | None = None,
        timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DoctorError(f"not an http(s) URL: {url!r}; give the stream's URL, e.g. https://host/api/stream")
        if parts.path in ("", "/"):
            url = _below(url, "api", "stream")  # a tokenwire server's root: its stream route
        self.url = url
        self.headers = dict(headers or {})
        self.body = body
        self.extra = body if isinstance(body, dict) else None  # fields added to the test streams' bodies
        self.idle = idle
        self.timeout = timeout
        self._client = client

    async def run(self) -> Report:
        client = self._client or httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, read=None))
        try:
            return await self._run(client)
        finally:
            if self._client is None:
                await client.aclose()

    async def _stream(self, client: httpx.AsyncClient, body: Any, **kwargs: Any) -> Capture:
        return await capture(client, "POST", self.url, headers=self.headers, body=body,
                             max_time=kwargs.pop("max_time", self.timeout), **kwargs)  # fmt: skip

    async def _run(self, client: httpx.AsyncClient) -> Report:
        plan = {"events": EVENTS, "interval_ms": INTERVAL_MS, "size": SIZE}
        first = await self._stream(client, doctor_body(self.extra, **plan))
        if first.ended == "cut" and first.status == 0:
            raise DoctorError(f"cannot reach {self.url}: {first.error}")
        if first.status == 401:
            raise DoctorError("the server wants an API key: add --header 'Authorization: Bearer <key>'")
        header, points = first.stamped() if first.is_event_stream else (None, [])
        if header is not None:
            return await self._tokenwire(client, first, header, points)
        return await self._client_side(client, first)

    async def _tokenwire(
        self, client: httpx.AsyncClient, first: Capture, header: dict[str, Any], points: list[Any]
    ) -> Report:
        heartbeat = header.get("stream_heartbeat")
        buffering = check_buffering(first, points, INTERVAL_MS / 1000)
        checks = [check_headers(first, tokenwire=True), buffering, check_compression(first, buffering)]
        checks.append(await self._cancellation(client, header.get("idle_timeout") or 60.0, buffering))
        checks.append(await self._resume(client))
        checks.append(await self._idle(client, heartbeat))
        note = f"stamped test streams, every check (heartbeat every {heartbeat:g} s)"
        return Report(self.url, "tokenwire with --diagnostics", note, hops_of(first.headers), checks)

    async def _client_side(self, client: httpx.AsyncClient, first: Capture) -> Report:
        """A server that is not tokenwire, or one without --diagnostics: what the client sees."""
        error = _json(first.body.decode("utf-8", "replace")) if first.body else None
        is_tokenwire = (isinstance(error, dict) and isinstance(error.get("error"), dict)
                        and {"type", "message", "retryable"} <= set(error["error"]))  # fmt: skip
        if first.is_event_stream:  # an event stream, but not a doctor stream: judge that one
            got, server = first, "tokenwire without --diagnostics" if "x-stream-id" in first.headers else "not tokenwire"
        else:
            if is_tokenwire:
                server = "tokenwire without --diagnostics"
                method, body = "POST", self.body if self.body is not None else DEFAULT_BODY
            else:
                server = "not tokenwire"
                method, body = ("POST", self.body) if self.body is not None else ("GET", None)
            got = await capture(client, method, self.url, headers=self.headers, body=body, max_time=self.timeout)
            if got.status == 0:
                raise DoctorError(f"cannot reach {self.url}: {got.error}")
            if got.status != 200:
                answer = got.body[:300].decode("utf-8", "replace").strip()
                hint = "" if self.body is not None or server != "not tokenwire" else " (--body JSON to POST instead)"
                raise DoctorError(f"{method} {self.url} answered {got.status}: {answer}; is it the stream's "
                                  f"URL?{hint}")  # fmt: skip
        needs = "start it with --diagnostics" if server.startswith("tokenwire") else "they need a tokenwire server"
        note = f"client-side checks only (headers, arrival pattern, compression); the others are skipped: {needs}"
        buffering = check_arrivals(got) if got.is_event_stream else Check("buffering", "skip", "no event stream")
        checks = [check_headers(got, tokenwire=False), buffering, check_compression(got, buffering)]
        for name in ("cancellation", "resume", "idle"):
            checks.append(Check(name, "skip", f"needs a tokenwire server with --diagnostics ({server})"))
        return Report(self.url, server, note, hops_of(got.headers), checks)

    async def _report(self, client: httpx.AsyncClient, stream_id: str) -> dict[str, Any] | None:
        response = await client.get(_sibling(self.url, "doctor", stream_id), headers=self.headers)
        report = _json(response.text) if response.status_code == 200 else None
        return report if isinstance(report, dict) and "generation" in report else None  # not a hop's page

    async def _cancellation(self, client: httpx.AsyncClient, idle_timeout: float, buffering: Check) -> Check:
        """Abort a stream while it is quiet; the server says whether and when its generation stopped.

        Quiet (no heartbeats either) as while a model reads a long prompt: a hop that only
        notices a client gone when a write to it fails notices nothing then.
        """
        gap = min(CANCEL_WAIT + 2, idle_timeout * 0.9)
        plan = {"events": 6, "interval_ms": 20, "size": SIZE, "idle_after": 3, "idle_s": gap, "heartbeat": False}
        body = doctor_body(self.extra, **plan)
        loop = asyncio.get_running_loop()
        # Once the events before the gap are in, or after a second of a chain holding them back.
        got = await self._stream(client, body, until=lambda got: len(got.events) >= 5, abort_after=1.0)
        stream_id = got.headers.get("x-stream-id")
        if got.ended != "abort" or not stream_id:
            return Check("cancellation", "fail", f"the test stream did not run ({got.status}, {got.ended}"
                         f"{': ' + got.error if got.error else ''})")  # fmt: skip
        _, points = got.stamped()
        base = min((arrived.at - sent for _, sent, arrived in points), default=None)
        deadline = loop.time() + CANCEL_WAIT
        report = None
        while loop.time() < deadline:
            report = await self._report(client, stream_id)
            generation = (report or {}).get("generation")
            if report is None or (generation and generation["stopped_after_s"] is not None) or report["ended"]:
                break
            await asyncio.sleep(0.05)
        evidence: dict[str, Any] = {"stream_id": stream_id, "aborted_after_s": round(got.ended_at, 4),
                                    "server": report}  # fmt: skip
        if report is None:
            return Check("cancellation", "fail", "the server has no report of the test stream (GET "
                         f"{_sibling(self.url, 'doctor', stream_id)} did not answer 200)", evidence)  # fmt: skip
        generation = report.get("generation")
        if generation is None:  # it ran on another replica: the log's end is all there is
            end = report.get("end") or {}
            if end.get("finish_reason") == "cancelled":
                return Check("cancellation", "pass", "the generation ended cancelled after the abort (it ran on "
                             "another replica, so its timing is not known here)", evidence)  # fmt: skip
        elif generation["stopped_after_s"] is not None and not generation["finished"]:
            reason = generation["stop_reason"]
            if base is not None:
                after = max(generation["stopped_after_s"] - (got.ended_at - base), 0.0)
                evidence["stopped_after_abort_s"] = round(after, 4)
                when = f"about {_ms(after)} after the abort"
            else:
                when = "after the abort"
            if reason == "client disconnected":
                return Check("cancellation", "pass", f"the server saw the client leave and stopped the "
                             f"generation {when}", evidence)  # fmt: skip
            return Check("cancellation", "warn", f"the generation stopped {when}, but for another reason: "
                         f"{reason}", evidence)  # fmt: skip
        if generation is not None and generation["finished"]:
            return Check("cancellation", "warn", "the test stream had ended before the client could abort it: the "
                         "chain held it back (see buffering), so this could not be tested", evidence,
                         FIXES["buffering"][:1])  # fmt: skip
        # Still running: stop it, and say what the chain did.
        sent = generation["events_sent"] if generation else "?"
        response = await client.delete(_below(self.url, stream_id), headers=self.headers)
        evidence["deleted"] = response.status_code
        summary = (f"{CANCEL_WAIT:g} s after the abort the server had not seen the client leave, and the model "
                   f"was still generating ({sent} events sent): a hop keeps the upstream connection open after "
                   "the client leaves, at least until it next writes to the client")  # fmt: skip
        fixes = FIXES["cancellation"]
        if buffering.status == "fail":
            summary += "; the chain also buffers, and a hop that holds the response back writes nothing to notice with"
            fixes = FIXES["buffering"][:1] + fixes
        return Check("cancellation", "fail", summary, evidence, fixes)

    async def _resume(self, client: httpx.AsyncClient) -> Check:
        """A resumable stream, left at once, read again with ``Last-Event-ID: 2``: does it go on at 3?"""
        body = {**doctor_body(self.extra, events=10, interval_ms=20, size=SIZE), "resumable": True}
        got = await self._stream(client, body, until=lambda got: True, abort_after=0.5)
        stream_id = got.headers.get("x-stream-id")
        if not stream_id:
            return Check("resume", "fail", f"the test stream did not start ({got.status} {got.ended})")
        url = _below(self.url, stream_id)
        resumed = await capture(client, "GET", url, headers={**self.headers, "last-event-id": "2"},
                                max_time=self.timeout)  # fmt: skip
        ids = [event.id for event in resumed.events if event.id]
        evidence = {"stream_id": stream_id, "sent_last_event_id": "2", "first_id_received": ids[0] if ids else None,
                    "status": resumed.status}  # fmt: skip
        if resumed.terminal is None:
            await client.delete(url, headers=self.headers)
        if not resumed.is_event_stream or not ids:
            return Check("resume", "fail", f"GET {url} did not resume the stream ({resumed.status} "
                         f"{resumed.body[:200].decode('utf-8', 'replace')})", evidence)  # fmt: skip
        if ids[0] == "3":
            return Check("resume", "pass", "Last-Event-ID reached the server: the stream went on after event 2",
                         evidence)  # fmt: skip
        if ids[0] == "1":
            return Check("resume", "fail", "Last-Event-ID did not reach the server: the stream started over from "
                         "event 1 (a hop drops the header)", evidence, FIXES["resume"])  # fmt: skip
        return Check("resume", "fail", f"the stream resumed at event {ids[0]}, not 3 (a hop changes "
                     "Last-Event-ID)", evidence, FIXES["resume"])  # fmt: skip

    async def _idle(self, client: httpx.AsyncClient, heartbeat: float | None) -> Check:
        """A silent gap of ``--idle`` seconds, with the server's heartbeats and without them."""
        if not self.idle:
            hint = f" (longer than the heartbeat, {heartbeat:g} s)" if heartbeat else ""
            return Check("idle", "skip", f"not asked for: add --idle SECONDS{hint}")
        plan = {"events": 4, "interval_ms": 20, "size": SIZE, "idle_after": 2, "idle_s": self.idle}
        max_time = self.idle + self.timeout
        with_heartbeats, without = await asyncio.gather(
            self._stream(client, doctor_body(self.extra, **plan), max_time=max_time),
            self._stream(client, doctor_body(self.extra, **plan, heartbeat=False), max_time=max_time),
        )
        for got in (with_heartbeats, without):
            if got.status != 200:
                message = got.body[:300].decode("utf-8", "replace")
                return Check("idle", "fail", f"the test stream was refused: {got.status} {message}")

        def quiet_before_cut(got: Capture) -> float:
            before = [event.at for event in got.events if event.at <= got.ended_at]
            return got.ended_at - (before[-1] if before else 0.0)

        evidence: dict[str, Any] = {"idle_s": self.idle, "heartbeat_s": heartbeat,
                                    "keepalives_received": len(with_heartbeats.keepalives)}  # fmt: skip
        cut_without = None if without.terminal is not None else quiet_before_cut(without)
        evidence["without_heartbeats"] = "survived" if cut_without is None else f"cut after {cut_without:.1f} s"
        if with_heartbeats.terminal is None:
            quiet = quiet_before_cut(with_heartbeats)
            evidence["with_heartbeats"] = f"cut after {quiet:.1f} s"
            summary = (f"a hop cut the stream after {quiet:.1f} s of quiet, although the server sends a heartbeat "
                       f"every {heartbeat:g} s: the chain's idle timeout is shorter than the heartbeat")  # fmt: skip
            return Check("idle", "fail", summary, evidence, FIXES["idle"])
        evidence["with_heartbeats"] = "survived"
        if cut_without is None:
            extra_note = "" if heartbeat is None or self.idle > heartbeat else (
                f"; the gap was shorter than the heartbeat ({heartbeat:g} s): use --idle above it to test heartbeats"
            )  # fmt: skip
            return Check("idle", "pass", f"a stream quiet for {self.idle:g} s survives the chain, with and without "
                         f"heartbeats{extra_note}", evidence)  # fmt: skip
        return Check("idle", "pass", f"the chain cuts a connection quiet for {cut_without:.1f} s, and the "
                     f"server's heartbeats (every {heartbeat:g} s, {len(with_heartbeats.keepalives)} sent in the "
                     f"gap) keep streams alive through a {self.idle:g} s silence", evidence)  # fmt: skip


async def run_doctor(url: str, **options: Any) -> Report:
    return await Doctor(url, **options).run()
