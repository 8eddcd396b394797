"""The app's guards through a real uvicorn: API keys, stream limits, CORS, metrics, routes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes import active_streams, iter_events, serve_app, wait_until
from tokenwire import ScriptedProvider, Settings, create_app

KEYS = "alice sk-alice-0123456789\nbob sk-bob-9876543210  # a comment\n"
ALICE = {"authorization": "Bearer sk-alice-0123456789"}
BOB = {"authorization": "Bearer sk-bob-9876543210"}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(KEYS)
    return path


@pytest.fixture(scope="module")
def guarded(keys_file: Path) -> Iterator[str]:
    settings = Settings(auth_keys_file=str(keys_file), max_streams_per_key=2, max_streams=3, resume_grace=30)
    app = create_app(settings, provider=ScriptedProvider(tokens=["x"] * 10_000, interval=0.05))
    with serve_app(app) as url:
        yield url


def start(client: httpx.Client, url: str, headers: dict[str, str], **body: object) -> httpx.Response:
    request = client.build_request("POST", url + "/api/stream", json={"prompt": "hi", **body}, headers=headers)
    return client.send(request, stream=True)


def test_no_key_or_a_wrong_key_is_401_json(guarded: str) -> None:
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "Basic sk-alice-0123456789"}):
        answer = httpx.post(guarded + "/api/stream", json={"prompt": "hi"}, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"]["type"] == "unauthorized"
        assert "sk-alice" not in answer.text
    assert httpx.get(guarded + "/api/stream/str_x").status_code == 401
    assert httpx.delete(guarded + "/api/stream/str_x").status_code == 401


def test_a_stream_belongs_to_its_key(guarded: str) -> None:
    with httpx.Client(timeout=5) as client:
        response = start(client, guarded, ALICE, resumable=True)
        try:
            assert response.status_code == 200
            stream_id = response.headers["x-stream-id"]
            events = iter_events(response)
            assert next(events)["type"] == "start"
            # Bob can neither resume nor cancel Alice's stream: to him it does not exist.
            assert client.get(f"{guarded}/api/stream/{stream_id}", headers=BOB).status_code == 404
            assert client.delete(f"{guarded}/api/stream/{stream_id}", headers=BOB).status_code == 404
            assert next(events)["type"] == "token"  # still running
            assert client.delete(f"{guarded}/api/stream/{stream_id}", headers=ALICE).status_code == 204
            rest = [e for e in events]
            assert rest[-1]["type"] == "done"
            assert rest[-1]["finish_reason"] == "cancelled"
        finally:
            response.close()
    assert wait_until(lambda: active_streams(guarded) == 0)


def test_per_key_and_global_limits(guarded: str) -> None:
    with httpx.Client(timeout=5) as client:
        open_streams = [start(client, guarded, ALICE), start(client, guarded, ALICE)]
        try:
            for response in open_streams:
                assert response.status_code == 200
            third = httpx.post(guarded + "/api/stream", json={"prompt": "hi"}, headers=ALICE)
            assert third.status_code == 429
            assert third.headers["retry-after"] == "1"
            assert third.json()["error"]["type"] == "rate_limited"
            open_streams.append(start(client, guarded, BOB))
            assert open_streams[-1].status_code == 200
            fourth = httpx.post(guarded + "/api/stream", json={"prompt": "hi"}, headers=BOB)
            assert fourth.status_code == 503
            assert fourth.json()["error"]["type"] == "overloaded"
        finally:
            for response in open_streams:
                response.close()
    assert wait_until(lambda: active_streams(guarded) == 0)
    assert httpx.post(guarded + "/api/stream", json={"prompt": "hi", "max_tokens": 1}, headers=ALICE).status_code == 200


@pytest.fixture(scope="module")
def open_app() -> Iterator[str]:
    app = create_app(Settings(), provider=ScriptedProvider(interval=0))
    with serve_app(app) as url:
        yield url


def test_cors_is_off_by_default(open_app: str) -> None:
    preflight = httpx.options(
        open_app + "/api/stream",
        headers={"origin": "https://evil.example", "access-control-request-method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    answer = httpx.post(open_app + "/api/stream", json={"prompt": "hi"}, headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in answer.headers


def test_cors_for_configured_origins() -> None:
    app = create_app(Settings(cors_origins="https://app.example"), provider=ScriptedProvider(interval=0))
    with serve_app(app) as url:
        preflight = httpx.options(
            url + "/api/stream",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,idempotency-key",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        answer = httpx.post(url + "/api/stream", json={"prompt": "hi"}, headers={"origin": "https://app.example"})
        assert answer.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-stream-id" in answer.headers["access-control-expose-headers"].lower()
        other = httpx.options(
            url + "/api/stream",
            headers={"origin": "https://other.example", "access-control-request-method": "POST"},
        )
        assert other.headers.get("access-control-allow-origin") != "https://other.example"


def test_metrics_count_streams_and_refusals(open_app: str) -> None:
    before = httpx.get(open_app + "/metrics").text
    httpx.post(open_app + "/api/stream", json={"prompt": "hi"})
    httpx.post(open_app + "/api/stream", content=b"{", headers={"content-type": "application/json"})
    answer = httpx.get(open_app + "/metrics")
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert _sample(text, "tokenwire_streams_started_total") == _sample(before, "tokenwire_streams_started_total") + 1
    assert _sample(text, 'tokenwire_requests_refused_total{type="invalid_request"}') >= 1
    assert _sample(text, 'tokenwire_streams_finished_total{outcome="stop"}') >= 1
    assert _sample(text, "tokenwire_bytes_sent_total") > _sample(before, "tokenwire_bytes_sent_total")
    assert _sample(text, "tokenwire_time_to_first_token_seconds_count") >= 1
    for family in ("tokenwire_active_streams", "tokenwire_inter_token_delay_seconds", "tokenwire_cancellations_total"):
        assert f"# TYPE {family} " in text


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_routes_answer_json_errors_and_static_files(open_app: str) -> None:
    missing = httpx.get(open_app + "/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    wrong = httpx.put(open_app + "/api/stream")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["type"] == "method_not_allowed"
    assert httpx.get(open_app + "/api/stream/str_unknown").json()["error"]["type"] == "not_found"
    assert httpx.get(open_app + "/api/stream/x?after=abc").status_code == 400
    js = httpx.get(open_app + "/tokenwire.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "export async function* streamTokens" in js.text
    page = httpx.get(open_app + "/")
    assert page.headers["content-type"].startswith("text/html")
    assert 'from "./tokenwire.js"' in page.text
    health = httpx.get(open_app + "/healthz").json()
    assert health["status"] == "ok"
    assert health["provider"] == "scripted"
