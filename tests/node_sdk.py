"""Running an npm SDK's script from a test: the packages' check, one case to its end, one held open.

The scripts under ``tests/js_sdk/`` print one JSON line per case. Their packages come from
``bench/node_modules`` (``npm ci --prefix bench``, which ``make test`` runs): without node or them
the tests skip, and in CI they fail.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components import unavailable

ROOT = Path(__file__).resolve().parents[1]
NODE_MODULES = ROOT / "bench" / "node_modules"
TIMEOUT = 20.0  # seconds one node run may take on a loaded machine


def require(*packages: str) -> None:
    """Skip (fail in CI) unless node and these packages of bench/node_modules are there."""
    missing = None
    if shutil.which("node") is None:
        missing = "node is needed: apt-get install nodejs"
    elif not all((NODE_MODULES / name / "package.json").is_file() for name in packages):
        missing = f"no {' / '.join(packages)} npm package: run `npm ci --prefix bench`"
    if missing:
        unavailable(missing, "node SDK")


def run(command: list[str]) -> dict[str, Any]:
    """Run one case of a script to its end; its last stdout line, parsed."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"node exited with {done.returncode}:\n{done.stderr}"
    return json.loads(done.stdout.splitlines()[-1])


@contextlib.contextmanager
def held_open(command: list[str]) -> Iterator[tuple[dict[str, Any], subprocess.Popen[str]]]:
    """Run a case that prints its line and then waits for stdin to close: ``(its line, the process)``.

    An abort case stays alive this way while the test checks the upstream: its process exiting
    would close its sockets too, and hide an abort that left the request open.
    """
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    node = subprocess.Popen(command, text=True, **pipes)  # type: ignore[call-overload]
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            line = pool.submit(node.stdout.readline).result(timeout=TIMEOUT)
        if not line:
            node.wait(timeout=TIMEOUT)
            pytest.fail(f"node printed nothing:\n{node.stderr.read()}")
        yield json.loads(line), node
        assert node.poll() is None, "node exited before the test was done with it"
    finally:
        node.stdin.close()
        try:
            node.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        node.stdout.close()
        node.stderr.close()
