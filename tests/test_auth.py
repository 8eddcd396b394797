"""The keys file: comments, duplicates, unnamed keys' principals; a `#` key through a real server."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes import active_streams, iter_events, serve_app, wait_until
from tokenwire import ConfigError, ScriptedProvider, Settings, create_app
from tokenwire._auth import KeyRing


def load(tmp_path: Path, text: str, name: str = "keys.txt") -> KeyRing:
    path = tmp_path / name
    path.write_text(text)
    return KeyRing.from_file(path)


def who(keys: KeyRing, key: str) -> str | None:
    return keys.principal_for(f"Bearer {key}")


def digest_prefixes(key: str) -> list[str]:
    """Every hex prefix of the key's SHA-256 of 4 characters or more: none may show in a principal or log."""
    hexdigest = hashlib.sha256(key.encode()).hexdigest()
    return [hexdigest[:k] for k in range(4, len(hexdigest) + 1)]


def test_a_hash_starts_a_comment_only_at_the_start_or_after_whitespace(tmp_path: Path) -> None:
    keys = load(
        tmp_path,
        "# the keys of the team\n"
        "sk-abc#TAIL\n"
        "alice sk-alice # her laptop\n"
        "   # an indented comment\n"
        "bob\tsk-b#ob\t# tab before the comment\n",
    )
    assert who(keys, "sk-abc#TAIL") == "key-line-2"
    assert who(keys, "sk-abc") is None  # the old parser cut the key here and accepted this
    assert who(keys, "sk-alice") == "alice"
    assert who(keys, "sk-alice # her laptop") is None
    assert who(keys, "sk-b#ob") == "bob"
    assert who(keys, "sk-b") is None


@pytest.mark.parametrize(
    "text",
    [
        "alice sk-dup-9f3\nbob sk-dup-9f3\n",  # under two names
        "alice sk-dup-9f3\nalice sk-dup-9f3\n",  # the same line twice
        "sk-dup-9f3\nsk-dup-9f3\n",  # unnamed twice
        "sk-dup-9f3\nbob sk-dup-9f3\n",  # unnamed and named
    ],
)
def test_the_same_key_twice_names_both_lines_and_never_the_key(tmp_path: Path, text: str) -> None:
    lines = text.splitlines()
    text = f"{lines[0]}\n# between\n\n{lines[1]}\n"  # lines 1 and 4
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    message = str(caught.value)
    assert str(tmp_path / "keys.txt") in message
    assert "lines 1 and 4 hold the same key" in message
    assert "delete one of them" in message
    assert "sk-dup" not in message and "9f3" not in message


def test_the_same_name_twice_names_both_lines(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "alice sk-one\nbob sk-two\nalice sk-three\n")
    message = str(caught.value)
    assert str(tmp_path / "keys.txt") in message
    assert "lines 1 and 3 both use the name 'alice'" in message
    assert "give each key its own name" in message
    assert not any(key in message for key in ("sk-one", "sk-two", "sk-three"))


def test_a_name_cannot_stand_for_an_unnamed_keys_line(tmp_path: Path) -> None:
    # Else 'key-line-3 sk-mine' would own the streams of the unnamed key on line 3.
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "key-line-3 sk-mine\n\nsk-theirs\n")
    message = str(caught.value)
    assert f"{tmp_path / 'keys.txt'}:1:" in message
    assert "reserved for unnamed keys; choose another name" in message
    assert "sk-" not in message


def test_other_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"keys.txt:2: expected 'KEY' or 'NAME KEY'"):
        load(tmp_path, "sk-one\nalice sk-two sk-three\n")
    with pytest.raises(ConfigError, match="holds no key"):
        load(tmp_path, "# only a comment\n\n")


def test_an_unnamed_keys_principal_is_its_line_and_reveals_nothing_of_the_key(tmp_path: Path) -> None:
    key = "sk-weak"
    keys = load(tmp_path, f"# comment\nalice sk-alice\n{key}\n")
    principal = who(keys, key)
    assert principal == "key-line-3"
    assert key not in principal
    assert not any(prefix in principal for prefix in digest_prefixes(key))


def test_replicas_loading_the_same_file_agree_on_principals(tmp_path: Path) -> None:
    # Two replicas may mount the file at different paths; the principals are stored in a shared Redis.
    text = "sk-first\nalice sk-alice\nsk-second\n"
    one, two = load(tmp_path, text, "a.txt"), load(tmp_path, text, "b.txt")
    for key in ("sk-first", "sk-alice", "sk-second"):
        assert who(one, key) == who(two, key) is not None


def test_an_edit_above_an_unnamed_key_moves_its_principal_with_the_line(tmp_path: Path) -> None:
    # What the module docstring promises: ownership follows the line, a name follows the key.
    before = load(tmp_path, "sk-unnamed\nalice sk-alice\n")
    after = load(tmp_path, "# added\nsk-unnamed\n\nalice sk-alice\n")
    assert (who(before, "sk-unnamed"), who(after, "sk-unnamed")) == ("key-line-1", "key-line-2")
    assert who(before, "sk-alice") == who(after, "sk-alice") == "alice"


def test_every_key_is_compared_whichever_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = load(tmp_path, "".join(f"user{i} sk-{i}\n" for i in range(5)))
    calls = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr("tokenwire._auth.hmac.compare_digest", counting)
    for presented in ("sk-0", "sk-4", "sk-nope"):
        calls.clear()
        keys.principal_for(f"Bearer {presented}")
        assert len(calls) == 5, presented


KEY = "sk-abc#TAIL"


@pytest.fixture(scope="module")
def hash_key_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# one unnamed key with a '#' in it\n{KEY}\n")
    app = create_app(Settings(auth_keys_file=str(path)), provider=ScriptedProvider(interval=0, echo=True))
    with serve_app(app) as url:
        yield url


def test_a_key_with_a_hash_works_through_the_server(
    hash_key_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = hash_key_server
    caplog.set_level(logging.INFO, logger="tokenwire")
    with httpx.Client(timeout=5) as client:
        body = {"prompt": "one two"}
        good = {"authorization": f"Bearer {KEY}"}
        with client.stream("POST", url + "/api/stream", json=body, headers=good) as response:
            assert response.status_code == 200
            events = list(iter_events(response))
        assert [e["type"] for e in events] == ["start", "token", "token", "done"]
        cut = client.post(url + "/api/stream", json=body, headers={"authorization": "Bearer sk-abc"})
        assert cut.status_code == 401
        assert "sk-abc" not in cut.text
        assert wait_until(lambda: active_streams(url, client) == 0)
    # The stream's log line names its principal: the line, nothing of the key.
    assert wait_until(lambda: any("principal=" in r.getMessage() for r in caplog.records))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "principal=key-line-2" in logged
    assert "sk-abc" not in logged and "TAIL" not in logged
    assert not any(prefix in logged for prefix in digest_prefixes(KEY))
