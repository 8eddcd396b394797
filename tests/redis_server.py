"""A real ``redis-server`` for the tests, on a free loopback port, in a temporary directory.

``run_redis_server()`` is a context manager yielding the URL; ``redis_url_fixture()`` makes a
session-scoped pytest fixture of it.  A missing ``redis-server`` skips the tests that need it,
except in CI (``CI`` set, and not ``false``/``0``), where it fails them: CI must run them.

:class:`RedisServer` is one that a test can take down mid-stream (``SHUTDOWN NOSAVE``, or SIGKILL)
and bring back on the same port, empty, as a restarted production Redis without persistence comes
back; :func:`require_redis_server` is the skip-or-fail rule above for tests that start their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from components import unavailable
from fakes import free_port

__all__ = [
    "RedisServer",
    "find_redis_server",
    "redis_url_fixture",
    "require_redis_server",
    "run_redis_server",
]


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


def redis_url_fixture(name: str = "redis_url") -> Callable[..., Iterator[str]]:
    """A session-scoped fixture yielding the URL of a ``redis-server`` started for the session.

    Use: ``redis_url = redis_url_fixture()`` at the top level of a test module or conftest.
    """

    @pytest.fixture(scope="session", name=name)
    def _redis_url() -> Iterator[str]:
        try:
            executable = find_redis_server()
        except FileNotFoundError as exc:
            unavailable(str(exc), "Redis")
        with run_redis_server(executable) as url:
            yield url

    return _redis_url


def require_redis_server() -> str:
    """The ``redis-server`` executable; skips the calling test without one, or fails it in CI."""
    try:
        return find_redis_server()
    except FileNotFoundError as exc:
        unavailable(str(exc), "Redis")


class RedisServer:
    """A ``redis-server`` on a loopback port that stays the same across :meth:`stop` and :meth:`start`.

    No persistence (``--save ""``, no AOF): after a restart the server is empty, as a production Redis
    without persistence comes back.  ``stop("shutdown")`` sends ``SHUTDOWN NOSAVE`` (clients see their
    connections closed); ``stop("kill")`` sends SIGKILL (the kernel closes them).  Use as a context
    manager, or call :meth:`close`: the process never outlives it.
    """

    def __init__(self, executable: str | None = None, *, startup_timeout: float = 10.0) -> None:
        self.executable = executable or find_redis_server()
        self.startup_timeout = startup_timeout
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, size: int = 2000) -> str:
        if self._tmp is None:
            return ""
        path = Path(self._tmp.name) / "redis.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def start(self) -> RedisServer:
        """Start it (on a free port the first time, on the same port after); return once it answers PING."""
        if self.running:
            return self
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tokenwire-redis-")
        first = self.port == 0
        for _attempt in range(3 if first else 1):  # a free port may be taken between probing and binding
            if first:
                self.port = free_port()
            log = str(Path(self._tmp.name) / "redis.log")
            args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", self._tmp.name, "--logfile", log]  # fmt: skip
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + self.startup_timeout
            while (
                self.process.poll() is None and time.monotonic() < deadline and not _answers_ping(self.port)
            ):
                time.sleep(0.01)
            if self.process.poll() is None and _answers_ping(self.port):
                return self
            self._reap()
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{self.log_tail()}")

    def stop(self, how: str = "shutdown", timeout: float = 5.0) -> None:
        """Take it down, ``"shutdown"`` (SHUTDOWN NOSAVE) or ``"kill"`` (SIGKILL); return once it is gone."""
        if how not in ("shutdown", "kill"):
            raise ValueError(f"how must be 'shutdown' or 'kill', not {how!r}")
        if not self.running:
            return
        assert self.process is not None
        if how == "kill":
            self.process.send_signal(signal.SIGKILL)
        else:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                    sock.sendall(b"SHUTDOWN NOSAVE\r\n")
                    sock.settimeout(timeout)
                    while sock.recv(1024):  # the server closes the connection as it exits
                        pass
            except OSError:
                pass
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._reap()
            raise RuntimeError(f"redis-server did not stop ({how}) within {timeout:g} s") from None
        # Down means refusing connections, which is what clients must see during the outage.
        if _answers_ping(self.port):
            raise RuntimeError(f"something else answers on port {self.port} after redis-server stopped")

    def close(self) -> None:
        self._reap()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _reap(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
