"""Settings: one dataclass, filled from flags and ``TOKENWIRE_*`` variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from ._exceptions import ConfigError
from ._relay import RelayOptions
from .providers.base import Provider
from .stores.base import LogLimits, StreamStore


@dataclass(slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    provider: str = "local"
    base_url: str = ""
    model: str = ""
    api_key_env: str = ""
    model_path: str = ""
    heartbeat: float = 15.0
    max_duration: float = 600.0
    resume_grace: float = 30.0
    retry_ms: int = 1000
    send_timeout: float = 30.0
    first_token_timeout: float = 120.0
    idle_timeout: float = 60.0
    connect_timeout: float = 10.0
    store: str = "memory"
    max_body: int = 1024 * 1024
    auth_keys_file: str = ""
    max_streams: int = 512
    max_streams_per_key: int = 32
    # Connection-level limits, enforced by the HTTP server (_server.py) before any route runs.
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 2048
    cors_origins: str = ""
    config: str = ""
    log_level: str = "info"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then ``TOKENWIRE_<NAME>`` variables, then ``overrides`` that are not None."""
        environ = os.environ if environ is None else environ
        settings = cls()
        for f in fields(cls):
            if f.name == "extra":
                continue
            raw = environ.get(f"TOKENWIRE_{f.name.upper()}")
            if raw is not None and raw != "":
                setattr(settings, f.name, _coerce(f.name, type(getattr(settings, f.name)), raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.provider not in PROVIDERS:
            raise ConfigError(f"unknown provider {self.provider!r}: use one of {', '.join(PROVIDERS)}")
        if self.provider == "openai" and not self.base_url:
            raise ConfigError("--provider openai needs --base-url (e.g. http://127.0.0.1:8080/v1)")
        for name in ("heartbeat", "max_duration", "send_timeout", "first_token_timeout", "idle_timeout",
                     "connect_timeout", "head_timeout", "body_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds")
        for name in ("max_streams", "max_streams_per_key", "max_body", "retry_ms", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_header_bytes < 1024:
            raise ConfigError("--max-header-bytes must be at least 1024 (a browser's headers are often 1 KB)")
        if self.resume_grace < 0:
            raise ConfigError("--resume-grace must be zero or more seconds")
        if not (self.store == "memory" or self.store.startswith(("redis://", "rediss://"))):
            raise ConfigError("--store must be 'memory' or a redis:// URL such as redis://127.0.0.1:6379/0")

    def relay_options(self) -> RelayOptions:
        return RelayOptions(
            heartbeat=self.heartbeat,
            max_duration=self.max_duration,
            resume_grace=self.resume_grace,
            send_timeout=self.send_timeout,
            first_token_timeout=self.first_token_timeout,
            idle_timeout=self.idle_timeout,
            retry_ms=self.retry_ms,
        )

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def create_provider(self) -> Provider:
        if self.config:
            # A routes file: one provider per model, each made as if by its own flags.
            import dataclasses

            from .providers.router import RoutedProvider, load_routes

            routes = load_routes(self.config)
            providers: dict[str, Provider] = {}
            for route in routes.routes:
                flags = dataclasses.replace(
                    self,
                    config="",
                    provider=route.provider,
                    base_url=route.base_url,
                    model=route.model or route.name,
                    api_key_env=route.api_key_env,
                    model_path=route.model_path or self.model_path,
                )
                try:
                    providers[route.name] = flags.create_provider()
                except ConfigError as exc:
                    raise ConfigError(f"{self.config}: [models.{route.name}]: {exc}") from None
            return RoutedProvider(providers, routes.default)
        if self.provider == "local":
            from .providers.local import LocalProvider

            return LocalProvider(self.model_path or None)
        if self.provider == "openai":
            from .providers.openai import OpenAIProvider

            return OpenAIProvider(
                self.base_url,
                model=self.model or None,
                api_key=self._api_key("OPENAI_API_KEY"),
                connect_timeout=self.connect_timeout,
            )
        if self.provider == "anthropic":
            from .providers.anthropic import AnthropicProvider

            return AnthropicProvider(
                self.base_url or None,
                model=self.model or None,
                api_key=self._api_key("ANTHROPIC_API_KEY"),
                connect_timeout=self.connect_timeout,
            )
        from .providers.scripted import ScriptedProvider

        return ScriptedProvider()

    def create_store(self) -> StreamStore:
        limits = LogLimits(ttl=max(self.resume_grace, 60.0))
        if self.store == "memory":
            from .stores.memory import MemoryStore

            return MemoryStore(limits)
        from .stores.redis import RedisStore

        return RedisStore(self.store, limits)

    def _api_key(self, default_env: str) -> str | None:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"no key found: set {self.api_key_env} or pass another variable's name to --api-key-env"
                )
            return key
        return os.environ.get(default_env) or None


PROVIDERS = ("local", "openai", "anthropic", "scripted")


def _coerce(name: str, kind: type, raw: str) -> object:
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"TOKENWIRE_{name.upper()}={raw!r} is not a number") from None
    return raw
