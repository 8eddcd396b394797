"""The providers ``--provider`` can name: the built-in ones, then plugins.

A provider is made by a *factory*: a callable that receives the server's
:class:`~tokenwire.Settings` and returns a :class:`~tokenwire.Provider`.  The
built-in providers (``local``, ``openai``, ``anthropic``, ``scripted``) are
factories below; another package adds one by declaring an entry point in the
group ``tokenwire.providers``, named after the provider::

    [project.entry-points."tokenwire.providers"]
    echo = "tokenwire_echo:create_provider"

The plugin contract:

* The factory is called once per provider the server runs (once more per
  ``[models.<name>]`` table of a routes file that names it), before the server
  starts, with the ``Settings`` of that provider: ``model``, ``base_url``,
  ``api_key_env``, ``model_path`` and ``connect_timeout`` are the ones meant for
  it; ``settings.api_key(default_env)`` reads the upstream key the way the
  built-in providers do.  Treat ``settings`` as read-only.
* It returns a new :class:`~tokenwire.Provider` and does no I/O: the server
  calls the provider's ``startup()`` once its event loop runs, and ``aclose()``
  at shutdown.
* A setting it cannot work with is a :class:`~tokenwire.ConfigError` whose
  message says the fix (``"--provider echo needs --model"``); the command line
  prints it and exits with status 2.

Entry points are only read when a name is not built in, or when the names are
listed (``--help``, an unknown name's error), so they cost a server that runs
a built-in provider nothing; a plugin's module is imported only when its
provider is made.  A plugin cannot replace a built-in provider: the built-in
name wins.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from .._exceptions import ConfigError
from .base import Provider

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint


class Settings(Protocol):
    """What a factory may read of the server's settings (:class:`tokenwire.Settings` has it all)."""

    model: str
    base_url: str
    api_key_env: str
    model_path: str
    connect_timeout: float

    def api_key(self, default_env: str) -> str | None:
        """The upstream key: from ``--api-key-env``'s variable, else from ``default_env``."""


ProviderFactory = Callable[[Settings], Provider]

ENTRY_POINT_GROUP = "tokenwire.providers"


def _create_local(settings: Settings) -> Provider:
    from .local import LocalProvider

    return LocalProvider(settings.model_path or None)


def _create_openai(settings: Settings) -> Provider:
    from .openai import OpenAIProvider

    return OpenAIProvider(
        settings.base_url,
        model=settings.model or None,
        api_key=settings.api_key("OPENAI_API_KEY"),
        connect_timeout=settings.connect_timeout,
    )


def _create_anthropic(settings: Settings) -> Provider:
    from .anthropic import AnthropicProvider

    return AnthropicProvider(
        settings.base_url or None,
        model=settings.model or None,
        api_key=settings.api_key("ANTHROPIC_API_KEY"),
        connect_timeout=settings.connect_timeout,
    )


def _create_scripted(settings: Settings) -> Provider:
    from .scripted import ScriptedProvider

    return ScriptedProvider()


BUILTIN_PROVIDERS: dict[str, ProviderFactory] = {
    "local": _create_local,
    "openai": _create_openai,
    "anthropic": _create_anthropic,
    "scripted": _create_scripted,
}


class ProviderNames:
    """Every provider name, as a container that reads entry points only when it must.

    ``name in PROVIDER_NAMES`` answers a built-in name at once; iterating lists
    the built-in names, then the plugins' in alphabetical order.  argparse takes it as ``choices``.
    """

    def __contains__(self, name: object) -> bool:
        if name in BUILTIN_PROVIDERS:
            return True
        return isinstance(name, str) and name in _plugin_entry_points()

    def __iter__(self) -> Iterator[str]:
        yield from BUILTIN_PROVIDERS
        yield from sorted(name for name in _plugin_entry_points() if name not in BUILTIN_PROVIDERS)


PROVIDER_NAMES = ProviderNames()


def create_provider(name: str, settings: Settings) -> Provider:
    """Make the provider called ``name`` from ``settings``; a :class:`ConfigError` says what to fix."""
    factory = BUILTIN_PROVIDERS.get(name)
    origin = "tokenwire"
    if factory is None:
        entry_point = _entry_point(name)
        origin = _package(entry_point)
        try:
            factory = entry_point.load()
        except Exception as exc:
            raise ConfigError(
                f"the provider {name!r} from the package {origin} failed to load ({entry_point.value}): "
                f"{type(exc).__name__}: {exc}; reinstall or upgrade that package"
            ) from exc
    provider = factory(settings)
    if not isinstance(provider, Provider):
        raise ConfigError(
            f"the provider {name!r} from the package {origin} returned an instance of "
            f"{type(provider).__qualname__}, not of tokenwire.Provider: upgrade the package, or report it"
        )
    return provider


def _entry_point(name: str) -> EntryPoint:
    found = _plugin_entry_points().get(name, [])
    if not found:
        known = ", ".join(PROVIDER_NAMES)
        raise ConfigError(
            f"unknown provider {name!r}: use one of {known}, or install a package that provides it "
            f"(entry point group {ENTRY_POINT_GROUP!r})"
        )
    packages = sorted({_package(entry_point) for entry_point in found})
    if len(packages) > 1:
        raise ConfigError(
            f"several packages provide the provider {name!r} ({', '.join(packages)}): uninstall all but one"
        )
    return found[0]


def _plugin_entry_points() -> dict[str, list[EntryPoint]]:
    """The group's entry points by name (read afresh: a scan takes milliseconds and is rare)."""
    # Imported here: importlib.metadata is not needed by a server that runs a built-in provider.
    from importlib.metadata import entry_points

    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    return by_name


def _package(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    if dist is None:
        return entry_point.module
    return f"{dist.name} {dist.version}"
