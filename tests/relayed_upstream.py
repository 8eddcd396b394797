"""The fixtures of a module that tests tokenwire in front of one fake OpenAI upstream.

    shared_upstream, base_url, upstream = relayed_upstream_fixtures()
    shared_upstream, upstream = upstream_fixtures()  # a module that serves tokenwire its own way

``shared_upstream``: the module's FakeOpenAIUpstream; ``base_url``: a real uvicorn serving
``create_app`` with the openai provider in front of it (model ``served-model``); ``upstream``: the
fake, reset to its defaults for each test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fakes import FakeOpenAIUpstream, serve_app
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider

MODEL = "served-model"


def upstream_fixtures() -> tuple[Callable[..., Any], Callable[..., Any]]:
    @pytest.fixture(scope="module")
    def shared_upstream() -> Iterator[FakeOpenAIUpstream]:
        with FakeOpenAIUpstream() as fake:
            yield fake

    @pytest.fixture
    def upstream(shared_upstream: FakeOpenAIUpstream) -> FakeOpenAIUpstream:
        return shared_upstream.reset()

    return shared_upstream, upstream


def relayed_upstream_fixtures() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    shared_upstream, upstream = upstream_fixtures()

    @pytest.fixture(scope="module")
    def base_url(shared_upstream: FakeOpenAIUpstream) -> Iterator[str]:
        provider = OpenAIProvider(shared_upstream.url + "/v1", model=MODEL)
        with serve_app(create_app(Settings(), provider=provider)) as url:
            yield url

    return shared_upstream, base_url, upstream
