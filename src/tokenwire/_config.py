"""Settings: one dataclass, filled from flags and ``TOKENWIRE_*`` variables.

Each field of :class:`Settings` is one setting, and the :func:`setting` that
declares it is the only place that says what it is.  From the field come the
``tokenwire serve`` flag (``--`` and the name with dashes) with its type, choices
and help, the ``TOKENWIRE_<NAME>`` variable, the checks of
:meth:`Settings.validate`, and README.md's flags table (:func:`settings_table`).
The fields are in the order the help and the table list them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from ._exceptions import ConfigError
from ._relay import RelayOptions
from .providers import registry
from .providers.base import Provider, available_cpus
from .stores.base import LogLimits, StreamStore

LOG_LEVELS = ("debug", "info", "warning", "error")
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "bytes": "bytes"}


@dataclass(frozen=True, slots=True)
class SettingInfo:
    """What a setting's field says about it, besides its name, type and default."""

    help: str  # one line for `tokenwire serve --help`, plain text
    doc: str = ""  # the README's "meaning" cell, Markdown; the help if empty
    unit: str = ""  # "s", "ms" or "bytes": shown after the default, and in the checks' messages
    shown: str = ""  # Markdown shown instead of an empty default ("bundled SmolLM2-135M")
    choices: Iterable[str] | None = None  # supports `in`, and is iterated only to list them
    positive: bool = False  # must be more than zero
    at_least: int | float | None = None
    hint: str = ""  # added to the message of a failed check: why the bound, how to get more choices


def setting(default: str | int | float, help: str, **info: Any) -> Any:
    """A field of :class:`Settings`: its default, and the :class:`SettingInfo` that describes it."""
    return dataclasses.field(default=default, metadata={"setting": SettingInfo(help, **info)})


@dataclass(slots=True, kw_only=True)
class Settings:
    """How ``tokenwire serve`` runs; see :func:`setting` for what each field carries."""

    host: str = setting("127.0.0.1", "address to listen on")
    port: int = setting(8000, "port to listen on")
    workers: str = setting(
        "1",
        "server processes sharing the port: a number, or auto (one per core); more than 1 needs --store redis://",
        doc="server processes sharing the port (`SO_REUSEPORT`): a number, or `auto` for one per core. More "
        "than one needs `--store redis://`; `--max-streams` and `--max-connections` are per process, and "
        "`/metrics` adds up all of them ([docs/deploy.md](docs/deploy.md#several-workers))",
    )
    provider: str = setting(
        "local",
        "model backend",
        doc="`local` (embedded llama.cpp), `openai` (any OpenAI-compatible server), `anthropic`, "
        "`scripted` (deterministic fake), or the name an installed plugin registers (an entry point in the "
        "group `tokenwire.providers`)",
        choices=registry.PROVIDER_NAMES,
        hint=f"or install a package that provides it as a {registry.ENTRY_POINT_GROUP!r} entry point",
    )
    model_path: str = setting(
        "", "GGUF file for the local provider", doc="any GGUF file for `local`", shown="bundled SmolLM2-135M"
    )
    base_url: str = setting(
        "",
        "upstream base URL for openai/anthropic, e.g. http://127.0.0.1:8080/v1",
        doc="upstream for `openai`, e.g. `http://127.0.0.1:8080/v1` (vLLM, llama.cpp server, Ollama, "
        "LM Studio, OpenAI)",
    )
    model: str = setting(
        "", "model name sent upstream / reported in start events", doc="model name sent upstream",
        shown="provider's",
    )  # fmt: skip
    api_key_env: str = setting(
        "",
        "name of the environment variable holding the upstream API key",
        doc="name of the variable holding the upstream key",
        shown="`OPENAI_API_KEY` / `ANTHROPIC_API_KEY`",
    )
    heartbeat: float = setting(
        15.0, "silence before a keepalive comment", doc="silence before a `: keepalive` comment",
        unit="s", positive=True,
    )  # fmt: skip
    max_duration: float = setting(
        600.0, "deadline of one generation", doc="deadline of one generation; ends with `done` / `timeout`",
        unit="s", positive=True,
    )  # fmt: skip
    send_timeout: float = setting(
        30.0,
        "drop a client that accepts no data for this long",
        doc="a client that accepts no data for this long is dropped and its generation cancelled",
        unit="s",
        positive=True,
    )
    resume_grace: float = setting(
        30.0,
        "how long a resumable stream outlives its client",
        doc="how long a `resumable` stream keeps generating after its client left",
        unit="s",
        at_least=0,
    )
    resumable_chats: bool = setting(
        False,
        "make every /api/chat stream resumable",
        doc="make every `/api/chat` stream resumable, as if its body had `\"resumable\": true` "
        "(for `useChat({resume: true})` apps that cannot add it)",
    )
    diagnostics: bool = setting(
        False,
        "serve test streams and GET /api/doctor/{id} for `tokenwire doctor` (same API keys)",
        doc="serve the `tokenwire-doctor` model's test streams and `GET /api/doctor/{id}`, for "
        "[`tokenwire doctor`](#is-the-proxy-chain-streaming-tokenwire-doctor); they take the same API keys "
        "as every stream and show a key only its own doctor streams",
    )
    retry_ms: int = setting(
        1000,
        "reconnection delay sent to clients as 'retry:'",
        doc="reconnection delay sent first as `retry:` (clients back off from it)",
        unit="ms",
        at_least=1,
    )
    first_token_timeout: float = setting(
        120.0,
        "upstream silence before the first token",
        doc="upstream silence before the first token; ends with `error` / `upstream_timeout` "
        "(heartbeats never hide a stall)",
        unit="s",
        positive=True,
    )
    idle_timeout: float = setting(
        60.0,
        "upstream silence between two tokens",
        doc="upstream silence between two tokens; ends with `error` / `upstream_timeout`",
        unit="s",
        positive=True,
    )
    connect_timeout: float = setting(10.0, "upstream connect timeout", unit="s", positive=True)
    max_body: int = setting(
        1024 * 1024, "request body limit", doc="request body limit (413)", unit="bytes", at_least=1
    )
    auth_keys_file: str = setting(
        "",
        "require 'Authorization: Bearer <key>' with a key from this file",
        doc="require `Authorization: Bearer <key>`; one `KEY` or `NAME KEY` per line; "
        "a stream belongs to its key",
    )
    max_streams: int = setting(
        512, "streams running at once before 503", doc="running streams before 503 (`Retry-After`)",
        at_least=1,
    )  # fmt: skip
    max_streams_per_key: int = setting(
        32, "streams per API key before 429", doc="running streams per key before 429 (`Retry-After`)",
        at_least=1,
    )  # fmt: skip
    # Connection-level limits, enforced by the HTTP server (_server.py) before any route runs.
    head_timeout: float = setting(
        10.0,
        "time for a request's line and headers to arrive; then 408 and close",
        doc="time for a request's line and headers to arrive; then 408 JSON and the connection is closed "
        "(a connection that sent nothing is just closed)",
        unit="s",
        positive=True,
    )
    body_timeout: float = setting(
        30.0,
        "time for a whole request body to arrive after its headers; then 408 and close",
        doc="time for the whole body to arrive after the headers (a deadline, not an idle limit: a 1 MiB "
        "body needs 35 KB/s); then 408 JSON and close",
        unit="s",
        positive=True,
    )
    max_header_bytes: int = setting(
        64 * 1024,
        "size of a request's header section before 431 (the request line: 64 KiB)",
        doc="size of the header section; 431 JSON as soon as it is passed (the request line has its own "
        "limit, 64 KiB: 414)",
        unit="bytes",
        at_least=1024,
        hint="a browser's headers are often 1 KB",
    )
    max_connections: int = setting(
        2048,
        "open connections before new ones get 503; every running stream and resume holds one, as does "
        "each idle keep-alive connection: keep it above --max-streams",
        doc="open connections before new ones get 503 JSON `overloaded` (`Retry-After: 1`); every stream, "
        "resume and idle keep-alive connection holds one, so keep it above `--max-streams`; lowered at "
        "startup if the open-file limit (`ulimit -n`) cannot hold it "
        "([docs/deploy.md](docs/deploy.md#connection-limits-and-nginx))",
        at_least=1,
    )
    cors_origins: str = setting(
        "",
        "comma-separated origins allowed to call the API",
        doc="comma-separated origins allowed to call the API from a browser",
        shown="off",
    )
    config: str = setting(
        "",
        "routes file (TOML): model -> provider, base_url, model, api_key_env",
        doc="TOML routes: the request's `model` picks provider, base URL and key (below)",
    )
    store: str = setting(
        "memory",
        "memory or redis://HOST:PORT/DB",
        doc="`memory` or `redis://HOST:PORT/DB` for several replicas",
    )
    log_level: str = setting("info", "how much the server logs", choices=LOG_LEVELS)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults, then ``TOKENWIRE_<NAME>`` variables, then ``overrides`` that are not None."""
        environ = os.environ if environ is None else environ
        settings = cls()
        for f in fields(cls):
            raw = environ.get(env_name(f.name))
            if raw is not None and raw != "":
                setattr(settings, f.name, _coerce(f, raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        settings.validate()
        return settings

    def validate(self) -> None:
        for f in fields(self):
            _check(f, getattr(self, f.name))
        if self.provider == "openai" and not self.base_url:
            raise ConfigError("--provider openai needs --base-url (e.g. http://127.0.0.1:8080/v1)")
        if not (self.store == "memory" or self.store.startswith(("redis://", "rediss://"))):
            raise ConfigError("--store must be 'memory' or a redis:// URL such as redis://127.0.0.1:6379/0")
        workers = self.worker_count()
        if workers > 1 and self.store == "memory":
            raise ConfigError(
                f"--workers {self.workers} runs {workers} processes, and the memory store lives in one of them: "
                "a stream started on one worker could not be resumed, cancelled or counted on another. "
                "Use --store redis://HOST:PORT/DB, or --workers 1"
            )

    def worker_count(self) -> int:
        """How many server processes ``--workers`` asks for (``auto``: the cores this process may run on)."""
        raw = str(self.workers).strip().lower()
        if raw == "auto":
            return available_cpus()
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"--workers must be a whole number of at least 1, or auto; not {self.workers!r}")
        return int(raw)

    def relay_options(self) -> RelayOptions:
        """The relay's options: the settings of the same names."""
        return RelayOptions(**{f.name: getattr(self, f.name) for f in fields(RelayOptions)})

    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def create_provider(self) -> Provider:
        """The provider ``--provider`` names, or a ``RoutedProvider`` for a routes file (``--config``)."""
        if not self.config:
            return registry.create_provider(self.provider, self)
        # A routes file: one provider per model, each made as if by its own flags.
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

    def create_store(self) -> StreamStore:
        limits = LogLimits(ttl=max(self.resume_grace, 60.0))
        if self.store == "memory":
            from .stores.memory import MemoryStore

            return MemoryStore(limits)
        from .stores.redis import RedisStore

        return RedisStore(self.store, limits)

    def api_key(self, default_env: str) -> str | None:
        """The upstream API key: from the variable ``--api-key-env`` names, else from ``default_env``."""
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"no key found: set {self.api_key_env} or pass another variable's name to --api-key-env"
                )
            return key
        return os.environ.get(default_env) or None


def flag_name(name: str) -> str:
    """``max_body`` -> ``--max-body``."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """``max_body`` -> ``TOKENWIRE_MAX_BODY``."""
    return "TOKENWIRE_" + name.upper()


def setting_info(f: dataclasses.Field[Any]) -> SettingInfo:
    info: SettingInfo = f.metadata["setting"]
    return info


def shown_default(f: dataclasses.Field[Any], *, markdown: bool = False) -> str:
    """The default as the help (plain text) or the README (Markdown) shows it; empty if there is none."""
    info = setting_info(f)
    if info.shown:
        return info.shown if markdown else info.shown.replace("`", "")
    if f.default == "":
        return "—" if markdown else ""
    if type(f.default) is bool:
        return "on" if f.default else "off"
    value = str(f.default).removesuffix(".0")  # 15.0 -> 15, as it would be typed
    text = f"`{value}`" if markdown else value
    return f"{text} {info.unit}" if info.unit else text


def settings_table() -> str:
    """README.md's flags table, from the fields (between its ``settings:begin``/``end`` markers)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(Settings):
        info = setting_info(f)
        meaning = info.doc or info.help
        if info.choices is not None and not info.doc:
            meaning += ": " + ", ".join(f"`{choice}`" for choice in info.choices)
        rows.append(f"| `{flag_name(f.name)}` | {shown_default(f, markdown=True)} | {meaning} |")
    return "\n".join(rows) + "\n"


def _check(f: dataclasses.Field[Any], value: Any) -> None:
    info = setting_info(f)
    flag = flag_name(f.name)
    hint = f" ({info.hint})" if info.hint else ""
    if info.choices is not None and value not in info.choices:
        what = f.name.replace("_", " ")
        raise ConfigError(f"unknown {what} {value!r}: {flag} takes one of {', '.join(info.choices)}{hint}")
    words = _UNIT_WORDS.get(info.unit, "")
    if info.positive and not value > 0:  # `not >` also refuses NaN
        raise ConfigError(f"{flag} must be a positive number" + (f" of {words}" if words else "") + hint)
    if info.at_least == 0 and not value >= 0:
        raise ConfigError(f"{flag} must be zero or more {words}".rstrip() + hint)
    if info.at_least is not None and not value >= info.at_least:
        raise ConfigError(f"{flag} must be at least {info.at_least} {info.unit}".rstrip() + hint)


#: What a TOKENWIRE_* variable of a true/false setting may say.
_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _coerce(f: dataclasses.Field[Any], raw: str) -> object:
    kind = type(f.default)
    if kind is bool:
        value = _BOOLEANS.get(raw.strip().lower())
        if value is None:
            raise ConfigError(f"{env_name(f.name)}={raw!r} must be true or false (1/0, yes/no, on/off)")
        return value
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise ConfigError(f"{env_name(f.name)}={raw!r} is not a number") from None
    return raw
