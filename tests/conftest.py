"""Shared test setup: only what every test directory needs, and the fixtures several modules share."""

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# ``import fakes`` (tests/fakes.py) from every test directory, tests/e2e/ included.
sys.path.insert(0, str(Path(__file__).parent))

from fakes import StreamEvents, active_streams, iter_events, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """A module's HTTP client for its server (the ``base_url`` fixture the module defines)."""
    with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
        yield http


@pytest.fixture
def stream_events(base_url: str, client: httpx.Client) -> StreamEvents:
    """POST a body to the module's server; the stream's events once it has ended and left the relay."""

    def stream(body: dict[str, Any]) -> list[dict[str, Any]]:
        with client.stream("POST", base_url + "/api/stream", json=body) as response:
            assert response.status_code == 200
            events = list(iter_events(response))
        assert wait_until(lambda: active_streams(base_url, client) == 0)
        return events

    return stream
