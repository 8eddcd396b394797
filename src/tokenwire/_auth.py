"""API keys: who is asking, checked in constant time.

The keys file has one key per line, optionally preceded by a name and a space
(``alice sk-…``); ``#`` starts a comment.  The name (or a digest of the key)
becomes the stream's principal: only it may resume or cancel its streams.
Keys themselves are never logged or echoed; only their SHA-256 is kept.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from ._exceptions import ConfigError


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
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ConfigError(f"{path}:{number}: expected 'KEY' or 'NAME KEY'")
            key = parts[-1]
            name = parts[0] if len(parts) == 2 else "key-" + _digest(key).hex()[:12]
            if name in keys:
                raise ConfigError(f"{path}:{number}: the name {name!r} is used twice")
            keys[name] = key
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

    def __len__(self) -> int:
        return len(self._digests)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
