"""tokenwire at a git revision against tokenwire now, interleaved in one run: did a change cost anything?

    python -m bench.ab 5919dfa                  # 200 and 500 streams x 20 tok/s, 4 rounds
    python -m bench.ab HEAD~3 --levels 100 --repeats 6

On a shared machine two full runs of the same code differ by more than most changes do (see
bench/README.md), so a before/after comparison across runs says little.  Here both servers run at once,
pinned to the same core, and every round measures one then the other (bench.relay.latency), so a slow
spell of the machine hits both.  The revision's ``src/`` is taken with ``git archive`` into a temporary
folder and put first on the old server's PYTHONPATH; everything else (uvicorn, redis-py …) is this
virtualenv's.  Prints p50/p99 latency and server CPU per relayed token, the figure noise moves least.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import relay, servers
from .__main__ import HERE, log, pinning
from .loadgen import Target
from .report import cpu_ratio
from .upstream import FakeUpstream


async def compare(revision: str, src: Path, levels: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Both servers measured in turn, round after round: ``bench.relay.latency``'s figures by level and name."""
    server_cpus, harness_cpus = pinning()
    if harness_cpus:
        os.sched_setaffinity(0, harness_cpus)
    upstream = FakeUpstream()
    await upstream.start()
    before = servers.tokenwire(upstream.base_url)
    before.name, before.env = revision, {"PYTHONPATH": str(src)}
    after = servers.tokenwire(upstream.base_url)
    after.name = "now"
    group = (before, after)
    try:
        for server in group:
            await asyncio.to_thread(server.start, cpus=server_cpus, log_dir=HERE / ".cache" / "ab")
        plan = dataclasses.replace(relay.FULL, levels=levels, repeats=repeats)
        targets = [Target(s.name, s.port) for s in group]
        out = await relay.latency(upstream, targets, {s.name: s.pid for s in group}, plan, log)
    finally:
        for server in group:
            server.stop()
        await upstream.aclose()
    return {"revision": revision, "repeats": repeats, "levels": out["levels"]}


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| streams | tokenwire | p50 ms | p99 ms | server CPU µs/token | CPU × the revision |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for level, by_name in result["levels"].items():
        for name, figures in by_name.items():
            ratio = cpu_ratio(by_name, name, result["revision"])
            lines.append(
                f"| {level} | {name} | {figures['p50_ms']:.2f} | {figures['p99_ms']:.2f} | "
                f"{figures['server_us_per_token']:.0f} | {ratio:.3f} |"
            )
    return lines


def checkout(revision: str, into: Path) -> Path:
    """The revision's ``src/`` under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(HERE.parent), "archive", revision, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


async def bench(revision: str, repeats: int) -> dict[str, Any]:
    """``make bench BASELINE=<revision>``: plain text at 200 and 500 streams, the revision against now."""
    with tempfile.TemporaryDirectory(prefix="tokenwire-ab-") as tmp:
        return await compare(revision, checkout(revision, Path(tmp)), (200, 500), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("revision", help="a git revision of this repository, e.g. HEAD~1 or a commit")
    parser.add_argument("--levels", default="200,500", help="concurrent streams, comma-separated")
    parser.add_argument("--repeats", type=int, default=4, help="rounds per level (each measures both)")
    args = parser.parse_args()
    levels = tuple(int(level) for level in args.levels.split(","))
    with tempfile.TemporaryDirectory(prefix="tokenwire-ab-") as tmp:
        result = asyncio.run(compare(args.revision, checkout(args.revision, Path(tmp)), levels, args.repeats))
    print("\n".join(table(result)))

if __name__ == "__main__":
    main()
