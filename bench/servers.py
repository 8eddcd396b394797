"""The relays under test, each a uvicorn server in a process of its own, pinned to one core.

All three run the same way: one uvicorn process, ``loop=auto`` and ``http=auto`` (uvloop and
httptools), log level ``warning`` (no access log), on a loopback port, relaying to the same fake
upstream.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TESTS = ROOT / "tests"


# Admission limits (512 streams, 32 per key by default) are policy, not speed: the benchmarks
# measure the relay itself, as the baselines have no such limits.
NO_ADMISSION_LIMITS = ["--max-streams", "100000", "--max-streams-per-key", "100000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limits(cpus: set[int] | None):  # type: ignore[no-untyped-def]
    def apply() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))

    return apply


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/healthz"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, *, cpus: set[int] | None, log_dir: Path, timeout: float = 60.0) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        log = open(self.log_path, "wb")
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_limits(cpus)
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited at start-up; see {self.log_path}:\n{self.tail_log()}")
            if _http_ok(self.port, self.ready_path):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer GET {self.ready_path} in {timeout:g} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def tail_log(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _http_ok(port: int, path: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"GET %s HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n" % path.encode())
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def tokenwire_serve(name: str, *flags: str, port: int | None = None) -> Server:
    """``tokenwire serve`` on loopback with ``flags`` (its provider among them): its argv, made in one place."""
    port = port or free_port()
    argv = [str(BIN / "tokenwire"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning"]
    return Server(name, [*argv, *flags], port)


def tokenwire(
    upstream_url: str, *, port: int | None = None, name: str = "tokenwire", store: str = "memory", workers: int = 1
) -> Server:
    flags = ["--provider", "openai", "--base-url", upstream_url, "--model", "fake", *NO_ADMISSION_LIMITS]
    flags += ["--store", store] + (["--workers", str(workers)] if workers != 1 else [])
    return tokenwire_serve(name, *flags, port=port)


def baseline(name: str, module: str, upstream_url: str, *, port: int | None = None) -> Server:
    port = port or free_port()
    argv = [
        sys.executable, "-m", "uvicorn", f"{module}:app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    return Server(name, argv, port, env={"BENCH_UPSTREAM": upstream_url})


def relays(upstream_url: str) -> list[Server]:
    """tokenwire and the two baselines, in the order the tables show them."""
    return [
        tokenwire(upstream_url),
        baseline("tutorial", "bench.baselines.tutorial", upstream_url),
        baseline("sse-starlette", "bench.baselines.sse_starlette", upstream_url),
    ]


def local_tokenwire(*, port: int | None = None) -> Server:
    return tokenwire_serve("tokenwire-local", "--provider", "local", *NO_ADMISSION_LIMITS, port=port)


@contextmanager
def redis_store() -> Iterator[str]:
    """A fresh ``redis-server`` for the bench, by the tests' own ``run_redis_server`` (one implementation)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from redis_server import run_redis_server

    with run_redis_server() as url:
        yield url
