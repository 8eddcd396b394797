"""What the benchmarks ran on, and a check that the monotonic clock is one clock for all processes."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "tokenwire", "uvicorn", "uvloop", "httptools", "starlette", "fastapi", "sse-starlette", "httpx",
    "httpcore", "httpx-sse", "llama_cpp_python", "py-spy", "aiohttp",
)  # fmt: skip


def describe(node_dir: Path) -> dict[str, object]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "-"
    versions["node"] = _run(["node", "--version"]).lstrip("v")
    for pkg in ("eventsource-parser", "eventsource-parser-4"):
        manifest = node_dir / "node_modules" / pkg / "package.json"
        if manifest.exists():
            import json

            versions[f"npm {pkg}"] = json.loads(manifest.read_text())["version"]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),  # before the runner pins itself
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "versions": versions,
        "clock": check_clock(),
    }


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "-"


def check_clock(rounds: int = 20) -> dict[str, object]:
    """Is ``time.monotonic_ns()`` in another process on the same timeline as ours?

    Linux's CLOCK_MONOTONIC is system-wide (time since boot, not per process), so a child's reading
    taken between two of ours must fall between them.  We check that ``rounds`` times.
    """
    code = "import sys,time\nfor line in sys.stdin:\n    print(time.monotonic_ns(), flush=True)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    ok = 0
    worst_window_us = 0.0
    try:
        for _ in range(rounds):
            before = time.monotonic_ns()
            child.stdin.write("\n")
            child.stdin.flush()
            theirs = int(child.stdout.readline())
            after = time.monotonic_ns()
            if before <= theirs <= after:
                ok += 1
            worst_window_us = max(worst_window_us, (after - before) / 1000)
    finally:
        child.stdin.close()
        child.wait()
    return {
        "clock": time.get_clock_info("monotonic").implementation,
        "rounds": rounds,
        "child_reading_between_ours": ok,
        "comparable": ok == rounds,
        "widest_bracket_us": round(worst_window_us, 1),
    }


if __name__ == "__main__":
    print(check_clock())
    print(time.monotonic_ns())
