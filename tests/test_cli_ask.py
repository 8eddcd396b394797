"""`tokenwire ask` against a real server that wants an API key: the key comes from a variable, never argv."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fakes import serve_app, wait_until
from tokenwire import ScriptedProvider, Settings, create_app

KEY = "sk-ask#TAIL"  # a '#' inside: the whole key must survive the keys file and the header
LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"alice {KEY}\n")
    # A resumable stream outlives its client by resume_grace: only ask's DELETE ends it sooner.
    settings = Settings(auth_keys_file=str(path), resume_grace=30)
    app = create_app(settings, provider=ScriptedProvider(interval=0.02, echo=True))
    with serve_app(app) as url:
        yield url, app


def ask(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("TOKENWIRE_API_KEY", "OTHER_KEY")}
    return subprocess.Popen(
        [sys.executable, "-m", "tokenwire", "ask", *args, "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=20)
    return process.returncode, out, err


def test_ask_sends_the_key_from_tokenwire_api_key(keyed) -> None:
    url, _ = keyed
    code, out, err = finish(ask(url, "the sky is blue", env={"TOKENWIRE_API_KEY": KEY}))
    assert code == 0, err
    assert out == "the sky is blue\n"


def test_ask_reads_the_variable_named_by_api_key_env(keyed) -> None:
    url, _ = keyed
    # TOKENWIRE_API_KEY holds a wrong key: the named variable wins.
    env = {"OTHER_KEY": KEY, "TOKENWIRE_API_KEY": "sk-wrong"}
    code, out, err = finish(ask(url, "hello there", "--api-key-env", "OTHER_KEY", env=env))
    assert code == 0, err
    assert out == "hello there\n"


def test_ask_without_a_key_says_which_variable_to_set(keyed) -> None:
    url, _ = keyed
    code, out, err = finish(ask(url, "hi"))
    assert code == 1
    assert out == ""
    assert "requires an API key (HTTP 401): set TOKENWIRE_API_KEY=<your key>" in err
    assert "--api-key-env" in err
    code, _, err = finish(ask(url, "hi", "--api-key-env", "OTHER_KEY", env={"TOKENWIRE_API_KEY": KEY}))
    assert code == 2  # named a variable that is not set: refused before any request
    assert "--api-key-env names OTHER_KEY, which is not set: export OTHER_KEY=<your key>" in err


def test_ask_with_a_wrong_key_says_which_variable_holds_it_and_not_the_key(keyed) -> None:
    url, _ = keyed
    code, out, err = finish(ask(url, "hi", env={"TOKENWIRE_API_KEY": "sk-wrong-secret"}))
    assert code == 1
    assert out == ""
    assert "refused the API key in TOKENWIRE_API_KEY (HTTP 401)" in err
    assert "sk-wrong-secret" not in err


def test_ctrl_c_in_ask_cancels_with_the_key(keyed) -> None:
    url, app = keyed
    relay = app.state.relay  # type: ignore[attr-defined]
    process = ask(url, LONG, env={"TOKENWIRE_API_KEY": KEY})
    try:
        assert process.stdout is not None
        assert process.stdout.read(len("word0 word1")) == "word0 word1"
        assert relay.active_streams == 1
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130, err
    # Without the key on its DELETE (401), the stream would run on for the 30 s grace.
    assert wait_until(lambda: relay.active_streams == 0, timeout=3)
