"""Providers from other packages: the ``tokenwire.providers`` entry points (providers/registry.py).

The plugin is a real package, tests/fixtures/reverse_provider, installed with pip into a temporary
directory that only these tests put on the path: every other test runs without it.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes import TOKENWIRE, free_port, iter_events, run_tokenwire_serve
from tokenwire import ConfigError, Provider, Settings
from tokenwire._cli import build_parser
from tokenwire.providers.registry import BUILTIN_PROVIDERS, PROVIDER_NAMES
from tokenwire.providers.router import RoutedProvider

FIXTURE = Path(__file__).parent / "fixtures" / "reverse_provider"
PLUGINS = ["reverse", "reverse-wrong", "reverse-broken"]  # the fixture's entry points


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed plugin (its module and its dist-info with the entry points)."""
    work = tmp_path_factory.mktemp("plugin")
    source = work / "source"
    shutil.copytree(FIXTURE, source)  # the build writes egg-info and build/ next to the sources
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(source)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return site


@pytest.fixture
def plugin_on_path(plugin_site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugin importable in this process, for this test only."""
    monkeypatch.syspath_prepend(str(plugin_site))
    yield plugin_site
    for module in ("tokenwire_reverse", "tokenwire_reverse_broken"):
        sys.modules.pop(module, None)


def test_the_plugin_is_not_in_the_project_environment() -> None:
    assert not set(PLUGINS) & set(PROVIDER_NAMES)
    assert "reverse" not in PROVIDER_NAMES


def test_tokenwire_serve_streams_a_plugins_tokens(
    plugin_site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(plugin_site))
    with run_tokenwire_serve(tmp_path, "--provider", "reverse", "--model", "parrot") as server:
        url = f"http://127.0.0.1:{server.port}/api/stream"
        with httpx.stream("POST", url, json={"prompt": "one two three"}, timeout=10) as response:
            assert response.status_code == 200
            events = list(iter_events(response))
    assert events[0]["type"] == "start" and events[0]["model"] == "parrot"
    assert [e["text"] for e in events if e["type"] == "token"] == ["parrot:", " three", " two", " one"]
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"


def serve_and_fail(plugin_site: Path, *flags: str) -> str:
    """``tokenwire serve`` with the plugin on its path, expected to refuse to start: its stderr."""
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    argv = [str(TOKENWIRE), "serve", "--host", "127.0.0.1", "--port", str(free_port()), *flags]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def test_a_plugin_that_fails_to_load_names_its_package(plugin_site: Path) -> None:
    stderr = serve_and_fail(plugin_site, "--provider", "reverse-broken")
    words = "from the package tokenwire-reverse 0.1.0 failed to load"
    assert stderr.startswith(f"tokenwire: the provider 'reverse-broken' {words}")
    assert "tokenwire_reverse_dependency_that_is_not_installed" in stderr
    assert "Traceback" not in stderr


def test_a_plugins_own_config_error_is_printed(plugin_site: Path) -> None:
    stderr = serve_and_fail(plugin_site, "--provider", "reverse")
    assert stderr.strip() == "tokenwire: --provider reverse needs --model (any name: it is said first)"


def test_the_plugins_are_listed_after_the_built_in_providers(
    plugin_on_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert list(PROVIDER_NAMES) == [*BUILTIN_PROVIDERS, *sorted(PLUGINS)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "local, openai, anthropic, scripted, reverse" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ConfigError, match="unknown provider 'gpt'.*scripted, reverse"):
        Settings.from_env({"TOKENWIRE_PROVIDER": "gpt"})


def test_a_plugin_is_made_from_the_settings(plugin_on_path: Path, tmp_path: Path) -> None:
    provider = Settings.from_env({"TOKENWIRE_PROVIDER": "reverse", "TOKENWIRE_MODEL": "m"}).create_provider()
    assert isinstance(provider, Provider)
    assert (type(provider).__module__, provider.default_model) == ("tokenwire_reverse", "m")
    routes = tmp_path / "routes.toml"
    routes.write_text('[models.backwards]\nprovider = "reverse"\n')
    routed = Settings(config=str(routes)).create_provider()
    assert isinstance(routed, RoutedProvider)
    assert type(routed.routes["backwards"]).__module__ == "tokenwire_reverse"
    assert routed.routes["backwards"].default_model == "backwards"  # the route's name is sent upstream


def test_a_factory_that_makes_no_provider_is_refused(plugin_on_path: Path) -> None:
    words = "'reverse-wrong' from the package tokenwire-reverse 0.1.0 returned an instance of object, not of"
    with pytest.raises(ConfigError, match=words):
        Settings.from_env({}, provider="reverse-wrong").create_provider()


def test_built_in_providers_never_read_entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading every installed package's entry points costs startup time: only a plugin's name pays it."""

    def fail(**_: object) -> object:
        raise AssertionError("entry points were read")

    monkeypatch.setattr(importlib.metadata, "entry_points", fail)
    args = build_parser().parse_args(["serve", "--provider", "scripted"])
    assert Settings.from_env({}, provider=args.provider).create_provider().name == "scripted"
    routes = tmp_path / "routes.toml"
    routes.write_text('[models.a]\nprovider = "scripted"\n')
    assert isinstance(Settings.from_env({}, config=str(routes)).create_provider(), RoutedProvider)
    with pytest.raises(AssertionError, match="entry points were read"):
        Settings.from_env({}, provider="reverse")


def test_the_settings_a_factory_is_promised_are_the_servers() -> None:
    # The registry describes what a factory may read as a Protocol (providers never import the
    # config layer): every attribute and method it names must exist on tokenwire.Settings.
    from tokenwire.providers import registry

    promised = set(registry.Settings.__annotations__) | {
        name for name, value in vars(registry.Settings).items() if callable(value) and not name.startswith("_")
    }
    assert promised >= {"model", "base_url", "api_key"}, promised
    settings = Settings()
    assert [name for name in sorted(promised) if not hasattr(settings, name)] == []
