"""API keys: who is asking, checked in constant time.

The keys file (``--auth-keys-file``) has one key per line, optionally preceded
by a name and whitespace (``alice sk-…``).  ``#`` starts a comment only at the
start of a line or after whitespace, so ``sk-abc#TAIL`` is one key and
``alice sk-abc  # laptop`` is alice's key ``sk-abc``; a key therefore cannot
begin with ``#``.  The same key twice (under any names) or the same name twice
is a startup error that names both lines: either would make a stream's owner
depend on which line wins.

A stream's *principal* is who may resume or cancel it.  It is stored with the
stream (in Redis, shared by every replica), compared when any replica is asked
about the stream, and written to the log.  For a named key it is the name.  For
an unnamed key it is ``key-line-N``, N being the key's line in the file (names
beginning with ``key-line-`` are refused, so that no name can stand for a line):

- It reveals nothing about the key.  Anything computed from the key (the old
  ``key-`` + 48 bits of its SHA-256), even with a salt written next to it,
  lets whoever reads the log test guesses at a weak key offline; hiding it
  needs a secret salt shared by every replica, and there is none.  (Keying a
  hash with the whole file is no secret either when the file holds one weak key.)
- Every replica that loads the same file derives the same principals, which a
  random id per process would not.  The line number, rather than a count of
  unnamed keys, is what an operator reading the log looks up in the file.
- Editing the file moves ownership with the line, not with the key.  The
  file is read at startup only, so a replica keeps its principals until it
  restarts.  After a restart with an edited file, a running or still-resumable
  stream (up to --max-duration plus the resume TTL) started by an unnamed key
  belongs to the unnamed key now on that line, if any: if lines above it were
  added or removed, its own key gets 404 for it and another key may resume or
  cancel it; replacing a key in place (a rotation) hands its streams to the
  new key.  During a rolling restart, replicas with the old and the new file
  disagree until all have restarted.  Give keys names (``NAME KEY``) when the
  file is edited while streams run: a name stays with its key wherever it moves.

Keys themselves are never logged or echoed, and no message names one; only
their SHA-256 is kept in memory, and a presented key is compared with
``hmac.compare_digest`` against every digest, whichever matches.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ._exceptions import ConfigError

UNNAMED_PREFIX = "key-line-"


class KeyRing:
    def __init__(self, keys: dict[str, str]) -> None:
        """``keys`` maps principal -> key."""
        self._digests = [(principal, _digest(key)) for principal, key in keys.items()]

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read --auth-keys-file {path}: {exc.strerror}") from None
        keys: dict[str, str] = {}
        line_of_principal: dict[str, int] = {}
        line_of_digest: dict[bytes, int] = {}  # load time only: no request's timing depends on this lookup
        for number, raw in enumerate(text.splitlines(), 1):
            parts = _strip_comment(raw).split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ConfigError(
                    f"{path}:{number}: expected 'KEY' or 'NAME KEY' "
                    "(a '#' starts a comment only after whitespace)"
                )
            key = parts[-1]
            if len(parts) == 2 and parts[0].startswith(UNNAMED_PREFIX):
                # Else a name could take over the streams of the unnamed key on the line it names.
                raise ConfigError(
                    f"{path}:{number}: names beginning with {UNNAMED_PREFIX!r} are reserved "
                    "for unnamed keys; choose another name"
                )
            principal = parts[0] if len(parts) == 2 else f"{UNNAMED_PREFIX}{number}"
            digest = _digest(key)
            if digest in line_of_digest:
                raise ConfigError(
                    f"{path}: lines {line_of_digest[digest]} and {number} hold the same key; "
                    "delete one of them (a key belongs to one principal)"
                )
            if principal in line_of_principal:
                first = line_of_principal[principal]
                raise ConfigError(
                    f"{path}: lines {first} and {number} both use the name {principal!r}; "
                    "give each key its own name"
                )
            line_of_digest[digest] = number
            line_of_principal[principal] = number
            keys[principal] = key
        if not keys:
            raise ConfigError(f"--auth-keys-file {path} holds no key")
        return cls(keys)

    def principal_for(self, authorization: str | None) -> str | None:
        """The principal of a ``Bearer`` key, or None.  Compares against every key."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        presented = _digest(key.strip())
        found = None
        for principal, digest in self._digests:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found


def _strip_comment(line: str) -> str:
    """``line`` up to its comment: a ``#`` first or after whitespace; any other ``#`` belongs to a key."""
    for i, char in enumerate(line):
        if char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
