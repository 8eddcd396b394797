import pytest

from tokenwire import ConfigError, Settings
from tokenwire._cli import build_parser


def test_env_then_flags():
    env = {"TOKENWIRE_PORT": "9001", "TOKENWIRE_BASE_URL": "http://x/v1", "TOKENWIRE_PROVIDER": "openai"}
    settings = Settings.from_env(env, port=None, heartbeat=2.5)
    assert settings.port == 9001
    assert settings.base_url == "http://x/v1"
    assert settings.heartbeat == 2.5
    assert Settings.from_env(env, port=9002).port == 9002


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"TOKENWIRE_PORT": "eighty"}, "not a number"),
        ({"TOKENWIRE_PROVIDER": "gpt"}, "unknown provider"),
        ({"TOKENWIRE_PROVIDER": "openai"}, "--base-url"),
        ({"TOKENWIRE_HEARTBEAT": "0"}, "--heartbeat"),
        ({"TOKENWIRE_STORE": "postgres://x"}, "redis://"),
    ],
)
def test_bad_settings_say_what_to_fix(env, words):
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


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
