"""Where tokenwire's server spends its CPU under 500 streams x 20 tokens/s: py-spy, summarized.

py-spy samples the server process from outside (``--nonblocking``: the server is never paused)
and writes collapsed stacks; idle samples (the loop waiting in epoll) are left out, so the
samples are the CPU time.  The summary gives the top functions by self time and by inclusive
time, and self time per package.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .loadgen import Target, run_streams
from .servers import Server

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
RATE = 250  # samples per second


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    return path


def _package(file: str) -> str:
    if file.startswith("stdlib/"):
        name = file.split("/")[1].removesuffix(".py")
        return "asyncio" if name == "asyncio" else f"stdlib {name}"
    return file.split("/")[0].removesuffix(".py")


def summarize(raw: Path, duration_s: float, top: int = 20) -> dict[str, Any]:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for frame in stack.split(";"):
            m = _FRAME.match(frame)
            if m is None:
                frames.append((frame, "?"))
                continue
            frames.append((m["func"], _short(m["file"])))
        names = [f"{func} ({file})" for func, file in frames]
        self_time[names[-1]] += count
        packages[_package(frames[-1][1])] += count
        for name in set(names):
            inclusive[name] += count
    return {
        "samples": total,
        "rate": RATE,
        "duration_s": duration_s,
        "busy_fraction": total / (RATE * duration_s) if duration_s else 0.0,
        "self": [(name, n / total) for name, n in self_time.most_common(top)] if total else [],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top + 15)] if total else [],
        "packages": [(name, n / total) for name, n in packages.most_common(12)] if total else [],
    }


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


async def profile(server: Server, streams: int, rate: float, duration_s: float, out_dir: Path, log: Any) -> dict[str, Any]:
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy is not installed"}
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{server.name}-{streams}-streams.txt"
    target = Target(server.name, server.port)
    load = asyncio.create_task(
        run_streams(target, streams, rate, ramp_s=1.0, measure_s=duration_s + 2.0, server_pid=server.pid)
    )
    await asyncio.sleep(1.5)
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--pid", str(server.pid), "--duration", str(int(duration_s)), "--rate", str(RATE),
        "--format", "raw", "--output", str(raw), "--nonblocking",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    result = await load
    if proc.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    summary = summarize(raw, duration_s)
    summary["raw"] = str(raw)
    summary["load"] = {"p99_ms": result.percentile_ms(99), "server_cpu": result.server_cpu, "streams": streams}
    log(f"profile {server.name}: {summary['samples']} samples, busy {summary['busy_fraction']:.0%}; top self:")
    for name, share in summary["self"][:8]:
        log(f"          {share:6.1%}  {name}")
    return summary
