"""Settings: each field is a flag, a variable, a set of checks and a row of README.md's table.

Run this file (``.venv/bin/python tests/test_config.py``) to rewrite README.md's flags table
from the fields.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tokenwire import ConfigError, RelayOptions, Settings
from tokenwire._cli import build_parser
from tokenwire._config import env_name, flag_name, setting_info, settings_table

README = Path(__file__).parent.parent / "README.md"
BEGIN, END = "<!-- settings:begin -->\n", "<!-- settings:end -->\n"
FIELDS = dataclasses.fields(Settings)

# What users and scripts rely on: changing one is a breaking change, not a refactoring.
DEFAULTS = {
    "host": "127.0.0.1", "port": 8000, "workers": "1", "provider": "local", "model_path": "", "base_url": "", "model": "",
    "api_key_env": "", "heartbeat": 15.0, "max_duration": 600.0, "send_timeout": 30.0, "resume_grace": 30.0,
    "resumable_chats": False, "diagnostics": False, "retry_ms": 1000, "first_token_timeout": 120.0, "idle_timeout": 60.0, "connect_timeout": 10.0,
    "max_body": 1048576, "auth_keys_file": "", "max_streams": 512, "max_streams_per_key": 32,
    "head_timeout": 10.0, "body_timeout": 30.0, "max_header_bytes": 65536, "max_connections": 2048,
    "cors_origins": "", "config": "", "store": "memory", "log_level": "info",
}  # fmt: skip


def test_the_settings_and_their_defaults_stay() -> None:
    assert {f.name: f.default for f in FIELDS} == DEFAULTS
    assert all(type(f.default) is type(DEFAULTS[f.name]) for f in FIELDS)


def test_the_relay_options_default_to_the_settings() -> None:
    """RelayOptions keeps its own defaults for library users; they must not drift from the flags'."""
    assert Settings().relay_options() == RelayOptions()
    assert Settings(heartbeat=2.0, retry_ms=5).relay_options() == RelayOptions(heartbeat=2.0, retry_ms=5)


def other_value(f: dataclasses.Field[Any]) -> str:
    """A valid value of ``f`` that is not its default, as a flag or a variable spells it."""
    # workers: one process (the memory store refuses more), spelt otherwise than the default.
    special = {"provider": "scripted", "log_level": "debug", "store": "redis://127.0.0.1:6379/1", "workers": "01"}
    if f.name in special:
        return special[f.name]
    if isinstance(f.default, str):
        return f"/tmp/{f.name}"
    return str(f.default * 2)


SWITCHES = [f for f in FIELDS if type(f.default) is bool]


@pytest.mark.parametrize("f", SWITCHES, ids=[f.name for f in SWITCHES])
def test_every_true_or_false_setting_is_a_switch_and_a_variable(f: dataclasses.Field[Any]) -> None:
    flag = flag_name(f.name)
    assert getattr(build_parser().parse_args(["serve", flag]), f.name) is True
    assert getattr(build_parser().parse_args(["serve", "--no-" + flag[2:]]), f.name) is False
    assert getattr(build_parser().parse_args(["serve"]), f.name) is None
    for raw, value in [("1", True), ("yes", True), ("On", True), ("0", False), ("false", False), ("off", False)]:
        assert getattr(Settings.from_env({env_name(f.name): raw}), f.name) is value
    with pytest.raises(ConfigError, match="must be true or false"):
        Settings.from_env({env_name(f.name): "maybe"})


@pytest.mark.parametrize("f", [f for f in FIELDS if f not in SWITCHES], ids=[f.name for f in FIELDS if f not in SWITCHES])
def test_every_setting_is_a_flag_and_a_variable(f: dataclasses.Field[Any]) -> None:
    raw = other_value(f)
    value = type(f.default)(raw)
    from_flag = getattr(build_parser().parse_args(["serve", flag_name(f.name), raw]), f.name)
    assert (from_flag, type(from_flag)) == (value, type(value))
    assert getattr(Settings.from_env({env_name(f.name): raw}), f.name) == value
    # Without the flag, argparse leaves None: the variable and then the field's default apply.
    assert getattr(build_parser().parse_args(["serve"]), f.name) is None
    assert getattr(Settings.from_env({}, **{f.name: None}), f.name) == f.default
    assert getattr(Settings.from_env({env_name(f.name): raw}, **{f.name: None}), f.name) == value


def test_env_then_flags():
    env = {"TOKENWIRE_PORT": "9001", "TOKENWIRE_BASE_URL": "http://x/v1", "TOKENWIRE_PROVIDER": "openai"}
    settings = Settings.from_env(env, port=None, heartbeat=2.5)
    assert settings.port == 9001
    assert settings.base_url == "http://x/v1"
    assert settings.heartbeat == 2.5
    assert Settings.from_env(env, port=9002).port == 9002


def test_the_help_shows_each_fields_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--heartbeat", "15 s"), ("--max-body", "1048576 bytes"), ("--retry-ms", "1000 ms"),
                          ("--store", "memory"), ("--model-path", "bundled SmolLM2-135M")]:  # fmt: skip
        assert re.search(f"{flag} [A-Z_]+ [^-]*default: {default}", text), flag
    for f in FIELDS:
        if f in SWITCHES:
            assert f"{flag_name(f.name)}, --no-{flag_name(f.name)[2:]} {setting_info(f).help}" in text
        else:
            assert f"{flag_name(f.name)} {f.name.upper()} {setting_info(f).help}" in text


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TOKENWIRE_PORT": "eighty"}, "TOKENWIRE_PORT='eighty' is not a number"),
        ({"TOKENWIRE_PROVIDER": "gpt"}, "unknown provider 'gpt': --provider takes one of local, openai"),
        ({"TOKENWIRE_PROVIDER": "openai"}, "--base-url"),
        ({"TOKENWIRE_HEARTBEAT": "0"}, "--heartbeat must be a positive number of seconds"),
        ({"TOKENWIRE_HEARTBEAT": "nan"}, "--heartbeat must be a positive number of seconds"),
        ({"TOKENWIRE_RESUME_GRACE": "-1"}, "--resume-grace must be zero or more seconds"),
        ({"TOKENWIRE_MAX_STREAMS": "0"}, "--max-streams must be at least 1$"),
        ({"TOKENWIRE_MAX_HEADER_BYTES": "1023"}, r"--max-header-bytes must be at least 1024 bytes \(a "),
        ({"TOKENWIRE_LOG_LEVEL": "loud"}, "unknown log level 'loud': --log-level takes one of debug, info"),
        ({"TOKENWIRE_STORE": "postgres://x"}, "redis://"),
    ],
)
def test_bad_settings_say_what_to_fix(env, words):
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


BOUNDED = [f for f in FIELDS if setting_info(f).positive or setting_info(f).at_least is not None]


@pytest.mark.parametrize("f", BOUNDED, ids=[f.name for f in BOUNDED])
def test_every_bound_is_checked_and_names_its_flag(f: dataclasses.Field[Any]) -> None:
    info = setting_info(f)
    lowest = 0 if info.positive else info.at_least
    bad = lowest if info.positive else lowest - 1
    with pytest.raises(ConfigError, match=f"^{flag_name(f.name)} must be "):
        Settings.from_env({env_name(f.name): str(bad)})
    assert getattr(Settings.from_env({env_name(f.name): str(lowest + 1)}), f.name) == lowest + 1


def test_missing_api_key_is_named(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    settings = Settings.from_env({}, provider="openai", base_url="http://127.0.0.1:1/v1", api_key_env="MY_KEY")
    with pytest.raises(ConfigError, match="set MY_KEY"):
        settings.create_provider()


def test_serve_flags_match_the_protocol():
    parser = build_parser()
    args = parser.parse_args(
        ["serve", "--host", "0.0.0.0", "--port", "1", "--provider", "scripted", "--base-url", "u", "--model", "m",
         "--api-key-env", "K", "--heartbeat", "1", "--max-duration", "2", "--resume-grace", "3",
         "--store", "redis://127.0.0.1:6379/0"]
    )
    assert (args.host, args.port, args.provider, args.store) == ("0.0.0.0", 1, "scripted", "redis://127.0.0.1:6379/0")
    assert (args.heartbeat, args.max_duration, args.resume_grace) == (1.0, 2.0, 3.0)


def readme_table(text: str) -> tuple[int, int]:
    """Where README.md's flags table is: between the markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return start, end


def test_the_readme_table_is_rendered_from_the_settings() -> None:
    text = README.read_text()
    start, end = readme_table(text)
    assert text[start:end] == settings_table(), (
        "README.md's flags table is not what Settings' fields say: "
        "change the fields (src/tokenwire/_config.py), then run `.venv/bin/python tests/test_config.py`"
    )


def test_the_table_has_a_row_per_flag() -> None:
    rows = settings_table().splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == [f"| `{flag_name(f.name)}`" for f in FIELDS]
    assert "| `--max-body` | `1048576` bytes | request body limit (413) |" in rows
    assert "| `--base-url` | — |" in "\n".join(rows)


if __name__ == "__main__":
    text = README.read_text()
    start, end = readme_table(text)
    README.write_text(text[:start] + settings_table() + text[end:])
    print(f"{README}: the flags table is rewritten from Settings' fields", file=sys.stderr)
