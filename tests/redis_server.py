"""A real ``redis-server`` for the tests, on a free loopback port, in a temporary directory.

``run_redis_server()`` is a context manager yielding the URL; ``redis_url_fixture()`` makes a
session-scoped pytest fixture of it.  A missing ``redis-server`` skips the tests that need it,
except in CI (``CI`` set, and not ``false``/``0``), where it fails them: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fakes import free_port

__all__ = ["find_redis_server", "redis_url_fixture", "run_redis_server"]


def find_redis_server() -> str:
    """The ``redis-server`` to run: ``$REDIS_SERVER``, else the one on ``PATH``, else Debian's."""
    for candidate in (os.environ.get("REDIS_SERVER"), shutil.which("redis-server"), "/usr/bin/redis-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "redis-server not found: install it (apt-get install redis-server) or set REDIS_SERVER"
    )


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def run_redis_server(executable: str | None = None, *, startup_timeout: float = 10.0) -> Iterator[str]:
    """Start ``redis-server`` (no persistence), wait until it answers PING, yield its URL, kill it."""
    executable = executable or find_redis_server()
    with tempfile.TemporaryDirectory(prefix="tokenwire-redis-") as tmp:
        log_path = Path(tmp) / "redis.log"
        for attempt in range(3):  # the free port may be taken between probing and binding
            port = free_port()
            args = [executable, "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no", "--dir", tmp, "--logfile", str(log_path)]
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + startup_timeout
                while proc.poll() is None and time.monotonic() < deadline and not _answers_ping(port):
                    time.sleep(0.02)
                if proc.poll() is None and _answers_ping(port):
                    yield f"redis://127.0.0.1:{port}/0"
                    return
                if attempt == 2 or proc.poll() is None:
                    log = log_path.read_text(errors="replace") if log_path.exists() else ""
                    raise RuntimeError(f"redis-server did not start on port {port}:\n{log[-2000:]}")
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def redis_url_fixture(name: str = "redis_url") -> Callable[..., Iterator[str]]:
    """A session-scoped fixture yielding the URL of a ``redis-server`` started for the session.

    Use: ``redis_url = redis_url_fixture()`` at the top level of a test module or conftest.
    """

    @pytest.fixture(scope="session", name=name)
    def _redis_url() -> Iterator[str]:
        try:
            executable = find_redis_server()
        except FileNotFoundError as exc:
            if _in_ci():
                pytest.fail(f"{exc} (CI must run the Redis tests)", pytrace=False)
            pytest.skip(str(exc))
        with run_redis_server(executable) as url:
            yield url

    return _redis_url
