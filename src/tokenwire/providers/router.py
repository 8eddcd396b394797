"""Model routing: the request's ``model`` picks one of several providers.

A routes file (``tokenwire serve --config routes.toml``) names the models a
client may ask for, and where each one is served::

    default = "small"

    [models.small]
    provider = "openai"                     # local, openai, anthropic, scripted or a plugin's name
    base_url = "http://127.0.0.1:8080/v1"
    model = "SmolLM2"                       # the name sent upstream (default: the route's name)
    api_key_env = "OPENAI_API_KEY"

    [models.claude]
    provider = "anthropic"
    model = "claude-sonnet-4-5"
    api_key_env = "ANTHROPIC_API_KEY"

The route's name is what clients send and what ``start`` events report; the
upstream name stays between tokenwire and the provider.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tomllib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from .._events import ProviderEvent
from .._exceptions import ConfigError, ProviderError
from .base import GenerationRequest, Provider
from .registry import PROVIDER_NAMES


class RoutedProvider(Provider):
    """Sends each request to ``routes[request.model or default]``.

    Each route's provider gets the request with ``model`` unset, so that it sends
    its own configured upstream name.  ``startup`` and ``aclose`` reach every route.
    """

    name = "routed"

    def __init__(self, routes: Mapping[str, Provider], default: str) -> None:
        if not routes:
            raise ConfigError("no models to route to: name at least one")
        if default not in routes:
            raise ConfigError(f"the default model {default!r} is not one of the models: {', '.join(routes)}")
        self.routes = dict(routes)
        self.default_model = default

    def __repr__(self) -> str:
        return f"RoutedProvider({self.routes!r}, default={self.default_model!r})"

    def model_names(self) -> list[str]:
        return list(self.routes)

    def check(self, request: GenerationRequest) -> None:
        provider = self.routes.get(self.model_for(request))
        if provider is not None:
            provider.check(request)

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        name = self.model_for(request)
        provider = self.routes.get(name)
        if provider is None:  # the app refuses unknown models with a 400 before this
            known = ", ".join(self.routes)
            return _raise(ProviderError("upstream_error", f"unknown model {name!r}; the models are: {known}"))
        return provider.stream(dataclasses.replace(request, model=None))

    async def startup(self) -> None:
        started: list[Provider] = []
        try:
            for provider in self.routes.values():
                await provider.startup()
                started.append(provider)
        except BaseException:
            await _close_all(started)
            raise

    async def aclose(self) -> None:
        await _close_all(list(self.routes.values()))


async def _raise(error: ProviderError) -> AsyncIterator[ProviderEvent]:
    raise error
    yield  # an async generator, like every provider's stream  # pragma: no cover


async def _close_all(providers: list[Provider]) -> None:
    """Close every provider even if some fail; then raise the first failure."""
    results = await asyncio.gather(*(p.aclose() for p in providers), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


# -- the routes file ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """One ``[models.<name>]`` table of a routes file."""

    name: str
    provider: str
    base_url: str = ""
    model: str = ""  # the upstream's name for it; the route's name if empty
    api_key_env: str = ""
    model_path: str = ""


@dataclass(frozen=True, slots=True)
class RoutesConfig:
    default: str
    routes: tuple[Route, ...]


_ROUTE_KEYS = tuple(f.name for f in dataclasses.fields(Route) if f.name != "name")


def load_routes(path: str) -> RoutesConfig:
    """Read and check a routes file; every :class:`ConfigError` names the file and the fix."""
    try:
        with open(path, "rb") as file:
            document = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read the routes file {path!r} (--config): {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_routes(document, path)


def parse_routes(document: dict[str, Any], path: str = "routes file") -> RoutesConfig:
    unknown = sorted(set(document) - {"default", "models"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; the keys are 'default' and [models.<name>] tables"
        )
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise ConfigError(
            f"{path}: no models: add a table per model, e.g. [models.small] with provider = \"openai\""
        )
    routes = tuple(_route(name, table, path) for name, table in models.items())
    default = document.get("default")
    if default is None:
        if len(routes) > 1:
            raise ConfigError(
                f"{path}: several models and no default: add e.g. default = {routes[0].name!r} at the top"
            )
        default = routes[0].name
    if not isinstance(default, str) or default not in models:
        raise ConfigError(f"{path}: default = {default!r} is not one of the models: {', '.join(models)}")
    return RoutesConfig(default, routes)


def _route(name: str, table: Any, path: str) -> Route:
    where = f"{path}: [models.{name}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table of provider, base_url, model, api_key_env")
    if not name:
        raise ConfigError(f"{path}: a model's name must not be empty")
    unknown = sorted(set(table) - set(_ROUTE_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; the keys are: {', '.join(_ROUTE_KEYS)}")
    for key, value in table.items():
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, e.g. {key} = \"...\"")
    provider = table.get("provider")
    if provider not in PROVIDER_NAMES:
        raise ConfigError(f"{where}: provider must be one of {', '.join(PROVIDER_NAMES)} (got {provider!r})")
    if provider == "openai" and not table.get("base_url"):
        raise ConfigError(f"{where}: provider \"openai\" needs base_url, e.g. base_url = \"http://127.0.0.1:8080/v1\"")
    return Route(name=name, **table)
