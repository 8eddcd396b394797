"""Model routing: a routes file (Settings.config, --config), RoutedProvider, the 400 for an unknown model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fake_anthropic import FakeAnthropicUpstream
from fakes import FakeOpenAIUpstream, active_streams, iter_events, run_async, serve_app, wait_until
from tokenwire import ConfigError, Finish, GenerationRequest, ProviderError, Settings, Token, create_app
from tokenwire.providers.anthropic import AnthropicProvider
from tokenwire.providers.base import Provider
from tokenwire.providers.openai import OpenAIProvider
from tokenwire.providers.router import RoutedProvider
from tokenwire.providers.scripted import ScriptedProvider

EXAMPLE = """
default = "small"
[models.small]
provider = "openai"
base_url = "http://127.0.0.1:8080/v1"
model = "SmolLM2"        # name sent upstream (default: the route name)
api_key_env = "OPENAI_API_KEY"
[models.claude]
provider = "anthropic"
model = "claude-sonnet-4-5"
api_key_env = "ANTHROPIC_API_KEY"
"""


def routes_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "routes.toml"
    path.write_text(text)
    return str(path)


# -- the routes file --------------------------------------------------------------


def test_the_example_routes_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-anthropic")
    provider = Settings(config=routes_file(tmp_path, EXAMPLE), connect_timeout=2.0).create_provider()
    assert isinstance(provider, RoutedProvider)
    assert provider.default_model == "small"
    small, claude = provider.routes["small"], provider.routes["claude"]
    assert isinstance(small, OpenAIProvider) and isinstance(claude, AnthropicProvider)
    assert (small.url, small.default_model) == ("http://127.0.0.1:8080/v1/chat/completions", "SmolLM2")
    assert claude.url == "https://api.anthropic.com/v1/messages"
    assert claude.default_model == "claude-sonnet-4-5"
    assert small._headers() == {"authorization": "Bearer sk-openai"}
    assert claude._headers()["x-api-key"] == "sk-anthropic"
    assert small._connect_timeout == claude._connect_timeout == 2.0
    assert provider.supports_model("claude") and not provider.supports_model("gpt-4")
    assert "sk-" not in repr(provider)


def test_a_single_model_needs_no_default_and_is_sent_by_its_name(tmp_path: Path) -> None:
    text = '[models."llama-3"]\nprovider = "openai"\nbase_url = "http://127.0.0.1:1/v1"\n'
    provider = Settings(config=routes_file(tmp_path, text)).create_provider()
    assert isinstance(provider, RoutedProvider)
    assert provider.default_model == "llama-3"
    assert provider.routes["llama-3"].default_model == "llama-3"


def test_the_routes_file_comes_from_the_environment_too(tmp_path: Path) -> None:
    path = routes_file(tmp_path, '[models.echo]\nprovider = "scripted"\n')
    provider = Settings.from_env({"TOKENWIRE_CONFIG": path}).create_provider()
    assert isinstance(provider, RoutedProvider) and isinstance(provider.routes["echo"], ScriptedProvider)


OPENAI = '[models.a]\nprovider = "openai"\nbase_url = "http://x/v1"\n'


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("default = ", "not valid TOML"),
        ('default = "a"\n', "no models"),
        ("[models]\n", "no models"),
        (OPENAI + '[models.b]\nprovider = "scripted"\n', "several models and no default"),
        ('default = "c"\n' + OPENAI, "default = 'c' is not one of the models: a"),
        ("default = 1\n" + OPENAI, "default = 1 is not one of the models"),
        ('colour = "blue"\n' + OPENAI, "unknown key 'colour'"),
        ('[models.a]\nprovider = "gpt"\n', r"\[models.a\]: provider must be one of local, openai, anthropic"),
        ("[models.a]\nbase_url = 'http://x'\n", "provider must be one of"),
        ('[models.a]\nprovider = "openai"\n', "needs base_url"),
        (OPENAI + 'url = "http://y"\n', "unknown key 'url'; the keys are: provider, base_url"),
        (OPENAI + "model = 5\n", "model must be a string"),
        ('[models]\na = "openai"\n', r"\[models.a\] must be a table"),
        ('[models.a]\nprovider = "anthropic"\napi_key_env = "NO_SUCH_KEY_VAR"\n',
         r"\[models.a\]: .*set NO_SUCH_KEY_VAR"),
    ],
    ids=["toml", "no-models", "empty-models", "no-default", "unknown-default", "default-int", "top-key",
         "provider", "no-provider", "no-base-url", "route-key", "route-type", "not-a-table", "no-key"],
)
def test_a_bad_routes_file_says_what_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, words: str
) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    path = routes_file(tmp_path, text)
    with pytest.raises(ConfigError, match=words) as info:
        Settings(config=path).create_provider()
    assert str(info.value).startswith(path)


def test_a_missing_routes_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the routes file .*--config"):
        Settings(config=str(tmp_path / "nope.toml")).create_provider()


# -- RoutedProvider alone -----------------------------------------------------------


class Recording(Provider):
    def __init__(self, log: list[str], name: str, fail: str = "") -> None:
        self.log, self.label, self.fail = log, name, fail
        self.default_model = name

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Any]:
        self.log.append(f"stream {self.label} model={request.model}")
        yield Finish("stop")

    async def startup(self) -> None:
        if self.fail == "startup":
            raise RuntimeError("no")
        self.log.append(f"startup {self.label}")

    async def aclose(self) -> None:
        self.log.append(f"aclose {self.label}")
        if self.fail == "aclose":
            raise RuntimeError("no")


def test_the_model_picks_the_route_and_the_route_sends_its_own_name() -> None:
    log: list[str] = []
    router = RoutedProvider({"a": Recording(log, "a"), "b": Recording(log, "b")}, "a")

    async def main() -> None:
        for model in ("b", None):
            request = GenerationRequest.from_prompt("hi", model=model)
            assert router.model_for(request) == (model or "a")
            assert [e async for e in router.stream(request)] == [Finish("stop")]

    run_async(main)
    assert log == ["stream b model=None", "stream a model=None"]


def test_an_unknown_model_is_a_provider_error_if_it_gets_that_far() -> None:
    router = RoutedProvider({"a": ScriptedProvider(interval=0)}, "a")

    async def main() -> None:
        with pytest.raises(ProviderError, match="unknown model 'z'; the models are: a"):
            async for _ in router.stream(GenerationRequest.from_prompt("hi", model="z")):
                pass

    run_async(main)


def test_startup_and_aclose_reach_every_route() -> None:
    log: list[str] = []
    router = RoutedProvider({"a": Recording(log, "a"), "b": Recording(log, "b", fail="aclose"),
                             "c": Recording(log, "c")}, "a")
    run_async(router.startup)
    with pytest.raises(RuntimeError):
        run_async(router.aclose)
    assert log == ["startup a", "startup b", "startup c", "aclose a", "aclose b", "aclose c"]


def test_a_failed_startup_closes_what_it_started() -> None:
    log: list[str] = []
    router = RoutedProvider({"a": Recording(log, "a"), "b": Recording(log, "b", fail="startup"),
                             "c": Recording(log, "c")}, "a")
    with pytest.raises(RuntimeError):
        run_async(router.startup)
    assert log == ["startup a", "aclose a"]


def test_a_router_needs_routes_and_a_known_default() -> None:
    with pytest.raises(ConfigError, match="no models"):
        RoutedProvider({}, "a")
    with pytest.raises(ConfigError, match="'b' is not one of the models: a"):
        RoutedProvider({"a": ScriptedProvider()}, "b")


# -- through the server -------------------------------------------------------------

Upstreams = tuple[FakeOpenAIUpstream, FakeAnthropicUpstream]


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    with FakeOpenAIUpstream() as openai, FakeAnthropicUpstream(api_key="sk-ant") as anthropic:
        yield openai, anthropic


@pytest.fixture(scope="module")
def server(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    openai, anthropic = upstreams
    text = f"""
default = "small"
[models.small]
provider = "openai"
base_url = "{openai.url}/v1"
model = "SmolLM2"
[models.claude]
provider = "anthropic"
base_url = "{anthropic.url}"
model = "claude-x"
api_key_env = "TEST_ROUTING_ANTHROPIC_KEY"
[models.echo]
provider = "scripted"
"""
    path = routes_file(tmp_path_factory.mktemp("routes"), text)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TEST_ROUTING_ANTHROPIC_KEY", "sk-ant")
        app = create_app(Settings(config=path))
    with serve_app(app) as url:
        yield url
    # Shutting down closed every route's connection pool.
    for fake in upstreams:
        connections = fake.connections
        assert wait_until(lambda: all(c.closed_at is not None for c in connections), 2.0)  # noqa: B023


@pytest.fixture
def fresh(upstreams: Upstreams) -> Upstreams:
    openai, anthropic = upstreams
    openai.reset()
    anthropic.reset().configure(api_key="sk-ant")
    return openai, anthropic


def post(url: str, body: dict[str, Any]) -> tuple[httpx.Response, list[dict[str, Any]]]:
    with httpx.stream("POST", url + "/api/stream", json=body, timeout=5) as response:
        events = list(iter_events(response)) if response.status_code == 200 else []
        if not events:
            response.read()
    assert wait_until(lambda: active_streams(url) == 0)
    return response, events


def test_the_request_model_picks_the_upstream(
    server: str, fresh: Upstreams
) -> None:
    openai, anthropic = fresh
    _, events = post(server, {"prompt": "hi", "model": "claude"})
    assert events[0]["model"] == "claude" and events[-1]["type"] == "done", events[-1]
    assert anthropic.wait_request().body["model"] == "claude-x"
    assert openai.request_count == 0

    _, events = post(server, {"prompt": "hi"})
    assert events[0]["model"] == "small" and events[-1]["type"] == "done"
    assert openai.wait_request().body["model"] == "SmolLM2"

    _, events = post(server, {"prompt": "hi", "model": "echo"})
    assert events[0]["model"] == "echo" and events[-1]["finish_reason"] == "stop"
    assert (openai.request_count, anthropic.request_count) == (1, 1)

    health = httpx.get(server + "/healthz").json()
    assert (health["provider"], health["model"]) == ("routed", "small")


def test_an_unknown_model_is_a_400_that_reaches_no_upstream(
    server: str, fresh: Upstreams
) -> None:
    response, _ = post(server, {"prompt": "hi", "model": "gpt-9"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request", "model")
    assert "gpt-9" in error["message"] and "claude" in error["message"]
    assert fresh[0].request_count == fresh[1].request_count == 0


def test_a_routed_stream_still_closes_its_upstream_on_abort(
    server: str, fresh: Upstreams
) -> None:
    anthropic = fresh[1]
    anthropic.configure(tokens=[f" t{i}" for i in range(2000)], interval=0.005)
    body = {"prompt": "hi", "model": "claude"}
    with httpx.stream("POST", server + "/api/stream", json=body, timeout=5) as r:
        for event in iter_events(r):
            if event["type"] == "token":
                break
        aborted_at = time.monotonic()
    closed_at = anthropic.wait_closed(2.0)
    assert closed_at is not None and closed_at - aborted_at < 1.0
    assert wait_until(lambda: active_streams(server) == 0)


def test_a_provider_stream_is_passed_through_unwrapped() -> None:
    # No generator in between: closing the stream closes the route's own generator at once.
    scripted = ScriptedProvider(interval=0)
    router = RoutedProvider({"a": scripted}, "a")

    async def main() -> None:
        stream = router.stream(GenerationRequest.from_prompt("hi"))
        assert stream.__qualname__ == "ScriptedProvider.stream"  # type: ignore[attr-defined]
        assert isinstance(await anext(stream), Token)
        await stream.aclose()  # type: ignore[attr-defined]

    run_async(main)
