"""``tokenwire doctor`` against real nginx set up well and badly, and against a plain SSE endpoint.

Each nginx setup has one fault (or none), and the doctor must name it with the nginx setting that fixes
it while passing the rest.  What nginx 1.22 does in each, as these tests found (see also test_nginx.py):

* ``proxy_buffering on`` with ``proxy_ignore_headers X-Accel-Buffering`` holds a close-delimited body
  (uvicorn's h11 backend answers nginx's HTTP/1.0 that way) until a 4 KiB buffer fills or it ends; a
  chunked one (the httptools backend) goes on read by read, so the doctor passes that one, correctly.
* gzip on ``text/event-stream`` with buffering holds everything to the end, and nginx then notices a
  client gone only when it writes: the abort is not passed on either.
* ``proxy_read_timeout`` shorter than tokenwire's heartbeat cuts a quiet stream.
* ``proxy_ignore_client_abort on`` keeps the upstream connection after the client left until nginx
  next writes to the client: the doctor aborts during a quiet gap, as when a model reads a long prompt.
* ``proxy_set_header Last-Event-ID ""`` drops the resume cursor.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import brotli
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from fakes import serve_app
from nginx import require_nginx, run_nginx
from tokenwire import ScriptedProvider, Settings, create_app
from tokenwire._doctor import Arrived, Capture, Report, check_arrivals, check_buffering, run_doctor
from tokenwire.providers.doctor import DOCTOR_MODEL

HEARTBEAT = 2.0  # s: the servers' heartbeat, under the 3 s quiet spell of --idle
IDLE = 3.0
KEYS = {"key-a": "alice", "key-b": "bob"}
WELL = 'proxy_http_version 1.1;\nproxy_set_header Connection "";'
IGNORE_X_ACCEL = "proxy_ignore_headers X-Accel-Buffering;"
GZIP = "gzip on; gzip_types text/event-stream; gzip_proxied any; gzip_min_length 1;"


def doctor(url: str, **options: Any) -> Report:
    return asyncio.run(run_doctor(url, **options))


def checks(report: Report) -> dict[str, str]:
    return {check.name: check.status for check in report.checks}


def check(report: Report, name: str) -> Any:
    return next(c for c in report.checks if c.name == name)


def nginx_fix(report: Report, name: str) -> str:
    """The verified nginx fix the report gives for the check ``name``."""
    fixes = [fix for fix in check(report, name).fixes if fix.hop == "nginx"]
    assert fixes and fixes[0].verified, check(report, name)
    return fixes[0].setting


@pytest.fixture(scope="module")
def nginx_executable() -> str:
    return require_nginx()


def diagnosed_app(**settings: Any) -> Starlette:
    return create_app(Settings(diagnostics=True, heartbeat=HEARTBEAT, **settings), provider=ScriptedProvider())


@pytest.fixture(scope="module", params=["httptools", "h11"])
def tokenwire(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A tokenwire with --diagnostics, on each of uvicorn's HTTP backends: (backend, base URL)."""
    with serve_app(diagnosed_app(), http=request.param) as url:
        yield request.param, url


@pytest.fixture(scope="module")
def chunked_tokenwire() -> Iterator[str]:
    with serve_app(diagnosed_app()) as url:
        yield url


def through(upstream: str, location: str) -> Any:
    return run_nginx([upstream], location=location)


def diagnosed(upstream: str, location: str, **options: Any) -> Report:
    """The doctor's report on tokenwire at ``upstream`` behind nginx with ``location``'s directives."""
    with through(upstream, location) as nginx:
        return doctor(nginx.url + "/api/stream", **options)


def only_failure(report: Report, name: str) -> Any:
    """The check ``name``, which must have failed, alone."""
    assert [c.name for c in report.failed] == [name], report.render()
    return check(report, name)


# -- nginx, each setup --------------------------------------------------------------


@pytest.mark.usefixtures("nginx_executable")
def test_a_well_configured_nginx_passes_every_check(tokenwire: tuple[str, str]) -> None:
    _, upstream = tokenwire
    report = diagnosed(upstream, WELL, idle=IDLE)
    assert report.server == "tokenwire with --diagnostics"
    assert checks(report) == dict.fromkeys(
        ["headers", "buffering", "compression", "cancellation", "resume", "idle"], "pass"
    ), report.render()
    assert any(hop.startswith("nginx") for hop in report.hops)
    assert "X-Accel-Buffering: no was removed on the way" in check(report, "headers").summary
    assert check(report, "buffering").evidence["lag_max_ms"] < 500
    assert check(report, "cancellation").evidence["stopped_after_abort_s"] < 1.0
    assert check(report, "idle").evidence["keepalives_received"] >= 1  # the 3 s gap held a 2 s heartbeat
    assert not report.failed


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_buffering_is_named_with_the_setting_that_fixes_it(tokenwire: tuple[str, str]) -> None:
    backend, upstream = tokenwire
    report = diagnosed(upstream, "proxy_buffering on;\n" + IGNORE_X_ACCEL)
    buffering = check(report, "buffering")
    if backend == "httptools":  # chunked: nginx passes each read on, nothing to fix
        assert buffering.status == "pass", report.render()
        return
    assert buffering.status == "fail", report.render()
    assert buffering.evidence["lag_max_ms"] > 500
    # A close-delimited body: held until a 4 KiB buffer fills (or the end).
    assert buffering.evidence["buffered"] == "batches", buffering.summary
    assert "batches of about 4 KiB" in buffering.summary and "a hop buffers 4 KiB" in buffering.summary
    assert "proxy_buffering off" in nginx_fix(report, "buffering")
    assert "proxy_ignore_headers X-Accel-Buffering" in nginx_fix(report, "buffering")
    assert checks(report)["compression"] == checks(report)["resume"] == "pass"


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_gzip_with_buffering_is_named_as_compression_and_buffering(chunked_tokenwire: str) -> None:
    report = diagnosed(chunked_tokenwire, f"{IGNORE_X_ACCEL}\n{GZIP}")
    assert check(report, "headers").evidence["content_encoding"] == "gzip"
    compression, buffering = check(report, "compression"), check(report, "buffering")
    assert compression.status == "fail" and "gzip-encoded and not event by event" in compression.summary
    assert "gzip off" in nginx_fix(report, "compression")
    assert buffering.status == "fail" and "a hop buffers the whole response" in buffering.summary
    assert buffering.summary.startswith(f"all {buffering.evidence['events']} events arrived within")
    # The held response hides the client's abort from nginx, or holds the answer's head until the test
    # stream has ended (whether nginx sends the head before its gzip buffer fills varies): either way
    # the report says so, with buffering's fix first.
    cancellation = check(report, "cancellation")
    assert (cancellation.status, "the chain also buffers" in cancellation.summary) in [
        ("fail", True), ("warn", False)
    ], cancellation.summary
    assert "proxy_buffering off" in cancellation.fixes[0].setting


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_gzip_without_buffering_still_streams_and_is_a_warning(chunked_tokenwire: str) -> None:
    report = diagnosed(chunked_tokenwire, GZIP)  # tokenwire's X-Accel-Buffering: no honoured
    assert checks(report)["buffering"] == "pass", report.render()
    compression = check(report, "compression")
    assert compression.status == "warn" and "still event by event" in compression.summary
    assert not report.failed


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_read_timeout_shorter_than_the_heartbeat_is_named(chunked_tokenwire: str) -> None:
    report = diagnosed(chunked_tokenwire, "proxy_read_timeout 1s;", idle=IDLE)
    idle = only_failure(report, "idle")
    assert "a hop cut the stream after 1.0 s of quiet" in idle.summary, idle.summary
    assert f"heartbeat every {HEARTBEAT:g} s" in idle.summary
    assert "proxy_read_timeout above tokenwire's --heartbeat" in nginx_fix(report, "idle")
    assert idle.evidence["without_heartbeats"] == "cut after 1.0 s"


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_that_ignores_the_clients_abort_is_named(chunked_tokenwire: str) -> None:
    report = diagnosed(chunked_tokenwire, "proxy_ignore_client_abort on;")
    cancellation = only_failure(report, "cancellation")
    assert "had not seen the client leave" in cancellation.summary
    assert "proxy_ignore_client_abort" in nginx_fix(report, "cancellation")
    assert cancellation.evidence["deleted"] == 204  # the doctor stopped the generation it left running


@pytest.mark.usefixtures("nginx_executable")
def test_nginx_that_drops_last_event_id_is_named(chunked_tokenwire: str) -> None:
    report = diagnosed(chunked_tokenwire, 'proxy_set_header Last-Event-ID "";')
    assert "started over from event 1" in only_failure(report, "resume").summary
    assert "proxy_set_header Last-Event-ID" in nginx_fix(report, "resume")


# -- servers that are not tokenwire, or without --diagnostics ------------------------------


async def ticks(count: int, interval: float, encode: Any = None) -> AsyncIterator[bytes]:
    for i in range(count):
        if i:
            await asyncio.sleep(interval)
        data = f"id: {i}\ndata: tick {i}\n\n".encode()
        yield encode(data) if encode else data


def plain_sse_app() -> Starlette:
    """A plain SSE endpoint (GET /events), and one that brotli-encodes it, flushing every event."""

    async def events(request: Request) -> StreamingResponse:
        return StreamingResponse(ticks(20, 0.05), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def brotli_events(request: Request) -> StreamingResponse:
        compressor = brotli.Compressor()
        encode = lambda data: compressor.process(data) + compressor.flush()  # noqa: E731
        return StreamingResponse(
            ticks(20, 0.05, encode),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "content-encoding": "br"},
        )

    return Starlette(routes=[Route("/events", events), Route("/br", brotli_events)])


@pytest.fixture(scope="module")
def plain_sse() -> Iterator[str]:
    with serve_app(plain_sse_app()) as url:
        yield url


def test_a_plain_sse_endpoint_gets_the_client_side_checks_and_says_so(plain_sse: str) -> None:
    report = doctor(plain_sse + "/events")
    assert report.server == "not tokenwire"
    assert "client-side checks only" in report.note
    assert checks(report) == {"headers": "pass", "buffering": "pass", "compression": "pass",
                              "cancellation": "skip", "resume": "skip", "idle": "skip"}  # fmt: skip
    assert check(report, "buffering").evidence["events"] == 20
    assert check(report, "buffering").evidence["batches"] >= 15  # 50 ms apart, each on its own


@pytest.mark.usefixtures("nginx_executable")
def test_a_plain_sse_endpoint_behind_buffering_nginx_is_a_warning(plain_sse: str) -> None:
    # No send times to compare with: held events are suspicious, not proof.
    with through(plain_sse, f"{IGNORE_X_ACCEL}\n{GZIP}") as nginx:
        report = doctor(nginx.url + "/events")
    buffering = check(report, "buffering")
    assert buffering.status == "warn" and "may buffer the whole response" in buffering.summary, report.render()
    assert check(report, "compression").status == "fail"


def test_a_brotli_encoded_stream_is_decoded_and_judged(plain_sse: str) -> None:
    report = doctor(plain_sse + "/br")
    assert check(report, "buffering").evidence["events"] == 20
    compression = check(report, "compression")
    assert compression.status == "warn" and "br-encoded, and still event by event" in compression.summary


def test_tokenwire_without_diagnostics_is_told_how_to_turn_them_on() -> None:
    with serve_app(create_app(Settings(), provider=ScriptedProvider())) as url:
        report = doctor(url + "/api/stream")
    assert report.server == "tokenwire without --diagnostics"
    assert "start it with --diagnostics" in report.note
    assert checks(report)["buffering"] == "pass" and checks(report)["cancellation"] == "skip"


# -- the diagnostics on the server ----------------------------------------------------


def test_diagnostics_are_off_by_default() -> None:
    app = create_app(Settings(), provider=ScriptedProvider())
    assert not any(getattr(route, "path", "").startswith("/api/doctor") for route in app.routes)


def test_the_diagnostics_route_takes_the_key_and_shows_only_ones_own_doctor_streams(tmp_path: Any) -> None:
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{name} {key}\n" for key, name in KEYS.items()))
    app = diagnosed_app(auth_keys_file=str(keys))

    def as_key(key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        plan = json.dumps({"nonce": "n0nce1234567", "events": 3, "interval_ms": 0})
        body = {"model": DOCTOR_MODEL, "messages": [{"role": "user", "content": plan}]}
        doctor_stream = client.post("/api/stream", json=body, headers=as_key("key-a"))
        assert doctor_stream.status_code == 200
        stream_id = doctor_stream.headers["x-stream-id"]
        plain = client.post("/api/stream", json={"prompt": "hi"}, headers=as_key("key-a"))
        assert client.get(f"/api/doctor/{stream_id}").status_code == 401
        assert client.get(f"/api/doctor/{stream_id}", headers=as_key("key-b")).status_code == 404  # not bob's
        plain_id = plain.headers["x-stream-id"]
        assert client.get(f"/api/doctor/{plain_id}", headers=as_key("key-a")).status_code == 404  # not a doctor's
        report = client.get(f"/api/doctor/{stream_id}", headers=as_key("key-a")).json()
        assert report["ended"] and report["end"]["type"] == "done"
        assert report["generation"] == {"events_sent": 3, "finished": True, "stopped_after_s": None,
                                        "stop_reason": None}  # fmt: skip
        # A bad plan: 400, saying what to fix.
        body["messages"][0]["content"] = json.dumps({"nonce": "n0nce1234567", "events": 0})
        refused = client.post("/api/stream", json=body, headers=as_key("key-a"))
        assert refused.status_code == 400
        assert "'events' must be from 1 to 2000" in refused.json()["error"]["message"]


# -- the judgements, on made-up arrivals ------------------------------------------------


def stamped(arrivals: list[float], interval: float = 0.04, size: int = 150) -> list[tuple[int, float, Arrived]]:
    return [(k + 1, k * interval, Arrived(at, str(k + 2), "", (k + 1) * size)) for k, at in enumerate(arrivals)]


def test_events_that_arrive_as_sent_pass() -> None:
    points = stamped([0.05 + k * 0.04 + 0.001 * (k % 3) for k in range(80)])
    got = Capture(reads=[(0.02, 10)])
    assert check_buffering(got, points, 0.04).status == "pass"


def test_events_held_to_the_end_are_the_whole_response() -> None:
    points = stamped([3.3 + 0.0001 * k for k in range(80)])
    result = check_buffering(Capture(reads=[(3.3, 12000)]), points, 0.04)
    assert result.status == "fail"
    assert result.summary == "all 80 events arrived within 8 ms, 3.2 s after the first was sent: a hop buffers the whole response"


def test_events_released_every_8_kib_are_batches_of_8_kib() -> None:
    # 150-byte events 40 ms apart; a hop passes 8 KiB on at a time: every 55 events, 2.2 s.
    per_batch = 8192 // 150 + 1
    arrivals = [(k // per_batch + 1) * per_batch * 0.04 for k in range(200)]
    result = check_buffering(Capture(reads=[(arrivals[0], 8192)]), stamped(arrivals), 0.04)
    assert result.status == "fail"
    assert "in 4 batches of about 8 KiB" in result.summary and "a hop buffers 8 KiB" in result.summary


def test_without_send_times_a_single_late_burst_is_only_a_warning() -> None:
    got = Capture(events=[Arrived(2.0 + 0.0001 * k, str(k), "x", k) for k in range(30)])
    assert check_arrivals(got).status == "warn"
    got = Capture(events=[Arrived(0.05 * k, str(k), "x", k) for k in range(30)])
    assert check_arrivals(got).status == "pass"


# -- the command ---------------------------------------------------------------------------


def tokenwire_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tokenwire", "doctor", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.usefixtures("nginx_executable")
def test_the_command_prints_the_report_and_exits_non_zero_on_a_failed_check(chunked_tokenwire: str) -> None:
    passed = tokenwire_doctor(chunked_tokenwire + "/api/stream")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "PASS  buffering" in passed.stdout and "No check failed." in passed.stdout
    with through(chunked_tokenwire, 'proxy_set_header Last-Event-ID "";') as nginx:
        failed = tokenwire_doctor(nginx.url + "/api/stream", "--json")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    report = json.loads(failed.stdout)
    assert report["ok"] is False
    assert [c["name"] for c in report["checks"] if c["status"] == "fail"] == ["resume"]


def test_the_command_says_what_is_wrong_when_it_cannot_run(plain_sse: str) -> None:
    unreachable = tokenwire_doctor("http://127.0.0.1:9/api/stream")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
    not_a_stream = tokenwire_doctor(plain_sse + "/nowhere")
    assert not_a_stream.returncode == 2 and "answered 404" in not_a_stream.stderr
    bad_header = tokenwire_doctor(plain_sse + "/events", "--header", "no colon")
    assert bad_header.returncode == 2 and "'Name: value'" in bad_header.stderr
