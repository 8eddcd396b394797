"""A real nginx for the tests, on a free loopback port, in a temporary directory.

``run_nginx(["http://127.0.0.1:8001", ...])`` writes an ``nginx.conf`` whose every path (pid file, error
and access logs, the temp directories of request and response bodies) lies in a fresh temporary
directory, starts ``nginx -c <conf> -p <tmpdir>`` in the foreground, waits until it accepts connections
and yields an :class:`Nginx`; on exit it stops nginx (fast shutdown: streams still open are cut).

It runs as any user and touches nothing under ``/etc/nginx`` or ``/var``.  ``master_process off``: the
one nginx process serves the requests itself, so that running as root does not switch the workers to
``nobody`` (who could not enter the private temporary directory), and round robin over the upstreams
is strictly alternating.

The proxying is nginx's default unless the caller adds directives: ``proxy_pass`` only, so
``proxy_buffering on`` and HTTP/1.0 to the upstream.  ``http=`` adds directives at ``http`` level,
``upstream=`` inside the ``upstream`` block (e.g. ``keepalive 8;``), ``location=`` inside
``location /``.  Every response carries ``X-Upstream-Addr`` (nginx's ``$upstream_addr``: which
upstream served it), which the scale-out tests use to tell the replicas apart.

A missing nginx skips the tests that need it, except in CI (``CI`` set, not ``false``/``0``), where it
fails them: CI must run them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from components import unavailable
from fakes import free_port

__all__ = ["Nginx", "find_nginx", "require_nginx", "run_nginx"]

CONF_TEMPLATE = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type application/octet-stream;

    upstream backends {{
{servers}
{upstream}
    }}
{http}
    server {{
        listen 127.0.0.1:{port};
        add_header X-Upstream-Addr $upstream_addr always;

        location / {{
            proxy_pass http://backends;
{location}
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Nginx:
    url: str  # http://127.0.0.1:<port>
    directory: Path  # the temporary prefix: nginx.conf, error.log, access.log …
    upstreams: tuple[str, ...]  # host:port of each upstream, as $upstream_addr names them

    @property
    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def find_nginx() -> str:
    """The nginx to run: ``$NGINX``, else the one on ``PATH``, else Debian's ``/usr/sbin/nginx``."""
    for candidate in (os.environ.get("NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError("nginx not found: install it (apt-get install nginx-light) or set NGINX")


def require_nginx() -> str:
    """The nginx executable; skips the calling test without one, fails it in CI."""
    try:
        return find_nginx()
    except FileNotFoundError as exc:
        unavailable(str(exc), "nginx")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _indent(directives: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line.strip() for line in directives.strip().splitlines() if line.strip())


def _host_port(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"an upstream needs a host and a port: {url!r}")
    return f"{parts.hostname}:{parts.port}"


@contextmanager
def run_nginx(
    upstreams: Sequence[str],
    *,
    location: str = "",
    http: str = "",
    upstream: str = "",
    executable: str | None = None,
    startup_timeout: float = 10.0,
) -> Iterator[Nginx]:
    """Start nginx in front of ``upstreams`` (URLs or host:port; round robin); yield it; stop it."""
    executable = executable or require_nginx()
    servers = tuple(_host_port(url) for url in upstreams)
    if not servers:
        raise ValueError("nginx needs at least one upstream")
    with tempfile.TemporaryDirectory(prefix="tokenwire-nginx-") as tmp:
        directory = Path(tmp)
        for attempt in range(3):  # the free port may be taken between probing and binding
            port = free_port()
            conf = directory / "nginx.conf"
            conf.write_text(
                CONF_TEMPLATE.format(
                    tmp=tmp,
                    port=port,
                    servers="\n".join(f"        server {server};" for server in servers),
                    http=_indent(http, 4),
                    location=_indent(location, 12),
                    upstream=_indent(upstream, 8),
                )
            )
            # -e: the log nginx writes before it has read the configuration (else /var/log/nginx).
            args = [executable, "-c", str(conf), "-p", tmp + "/", "-e", str(directory / "startup.log")]
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            try:
                deadline = time.monotonic() + startup_timeout
                while proc.poll() is None and time.monotonic() < deadline and not _accepts(port):
                    time.sleep(0.02)
                if proc.poll() is None and _accepts(port):
                    yield Nginx(f"http://127.0.0.1:{port}", directory, servers)
                    return
                if attempt == 2 or proc.poll() is None:
                    logs = "".join(
                        (directory / name).read_text(errors="replace")
                        for name in ("startup.log", "error.log")
                        if (directory / name).exists()
                    )
                    raise RuntimeError(f"nginx did not start on port {port}:\n{logs[-3000:]}")
            finally:
                _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # fast shutdown: open streams are cut, not waited for
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
