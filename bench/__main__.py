"""Run the benchmarks and write RESULTS.md, results.json and plots/.

    python -m bench                 # everything, ~45 minutes; writes bench/RESULTS.md, bench/plots/
    python -m bench --quick         # ~4 minutes; writes bench/.cache/quick/ unless --out says otherwise
    python -m bench --only latency,cancel
    python -m bench --report-only   # re-render RESULTS.md and plots from results.json
    python -m bench --baseline fc06208   # also: plain text against that revision (make bench BASELINE=…)

Sections: latency, ceiling, cancel, memory, profile, upstream_client (the openai provider on its own HTTP
client, on httpx and on aiohttp, interleaved; ~3 minutes), encodings, paths (the Redis store and a mounted
relay against the memory store), workers (the ceiling with one worker and two), burst (200 and 500 streams started at
once while 100 run, unpinned and pinned; ~5 minutes), local, parsers, soak (10 minutes per store; 30 s
with ``--quick``), faults (lost cancels, a killed replica, a Redis restart; ~2 minutes), abuse (slowloris,
slow bodies, huge headers, a connection flood, with normal requests meanwhile; ~1 minute).  Installs its own
dependencies first (bench/requirements.txt into this venv, bench/package.json with ``npm ci``) unless
``--no-install``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

HERE = Path(__file__).resolve().parent
SECTIONS = (
    "latency", "ceiling", "cancel", "memory", "profile", "upstream_client", "encodings", "paths", "burst", "workers", "baseline", "local",
    "parsers", "soak", "faults", "abuse",
)  # fmt: skip


def install() -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(HERE / "requirements.txt")],
        check=True,
    )  # fmt: skip
    if not (HERE / "node_modules" / ".package-lock.json").exists() or (
        (HERE / "package-lock.json").stat().st_mtime > (HERE / "node_modules" / ".package-lock.json").stat().st_mtime
    ):
        subprocess.run(["npm", "ci", "--prefix", str(HERE), "--no-audit", "--no-fund", "--loglevel=error"], check=True)


def log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of the whole machine, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


class Section:
    """Notes the load average when a section starts and the hypervisor's CPU steal during it."""

    def __init__(self, results: dict[str, Any], name: str) -> None:
        self.results, self.name = results, name

    def __enter__(self) -> None:
        self.results.setdefault("loadavg", {})[self.name] = loadavg()
        self.results.setdefault("section_started", {})[self.name] = time.strftime("%H:%M")
        self.ticks = cpu_ticks()

    def __exit__(self, *exc: object) -> None:
        steal, total = cpu_ticks()
        d_total = total - self.ticks[1]
        self.results.setdefault("steal", {})[self.name] = (steal - self.ticks[0]) / d_total if d_total else 0.0


def pinning() -> tuple[set[int] | None, set[int] | None]:
    """One CPU for the relay under test, another for the harness (upstream + load generator)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[1]}


async def run(
    sections: list[str],
    plan: Any,
    out_dir: Path,
    results: dict[str, Any],
    cpus: tuple[set[int] | None, set[int] | None],
    baseline: str | None = None,
) -> None:
    from . import local as local_bench
    from . import machine, parsers, relay, servers
    from . import profile as profile_bench
    from .loadgen import Target
    from .upstream import FakeUpstream

    server_cpus, harness_cpus = cpus
    results["pinning"] = {
        "server": ",".join(map(str, sorted(server_cpus))) if server_cpus else "unpinned",
        "harness": ",".join(map(str, sorted(harness_cpus))) if harness_cpus else "unpinned",
    }
    results["machine"] = machine.describe(HERE)
    log_dir = out_dir / "logs"

    async def measure(name: str, work: Callable[[], Awaitable[Any]]) -> None:
        """The section ``name``, if asked for: its figures, or its failure, saved at once.

        A failed section is logged whole and named in RESULTS.md, and the run goes on to the next:
        one section's bug must not cost the rest of an hour's run.
        """
        if name not in sections:
            return
        results.get("failed", {}).pop(name, None)
        with Section(results, name):
            try:
                results[name] = await work()
            except Exception as exc:
                results.pop(name, None)
                results.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} FAILED:\n{traceback.format_exc()}")
        _save(results, out_dir)

    def section(name: str) -> Any:  # a section's module, imported once it runs
        return importlib.import_module(f".{name}", __package__)

    upstream = FakeUpstream()
    await upstream.start()
    loopback = Target("loopback", upstream.port, "/v1/chat/completions", openai=True)
    log(f"fake upstream on {upstream.base_url}")

    async def start(group: list[servers.Server]) -> None:
        await asyncio.gather(*(asyncio.to_thread(s.start, cpus=server_cpus, log_dir=log_dir) for s in group))

    try:
        shared = [s for s in ("latency", "ceiling", "cancel") if s in sections]
        if shared:
            group = servers.relays(upstream.base_url)
            await start(group)
            try:
                targets = [loopback] + [Target(s.name, s.port) for s in group]
                pids: dict[str, int | None] = {s.name: s.pid for s in group}
                for name, fn in (
                    ("latency", relay.latency), ("ceiling", relay.ceiling), ("cancel", relay.cancellation)
                ):  # fmt: skip
                    await measure(name, lambda fn=fn: fn(upstream, targets, pids, plan, log))
            finally:
                for s in group:
                    s.stop()
        if "memory" in sections:
            group = servers.relays(upstream.base_url)
            await start(group)
            try:
                await measure("memory", lambda: relay.memory(upstream, group, plan, log))
            finally:
                for s in group:
                    s.stop()
        if "profile" in sections:
            server = servers.tokenwire(upstream.base_url)
            await start([server])
            try:
                await measure("profile", lambda: profile_bench.profile(
                    server, plan.profile_streams, plan.rate, plan.profile_s, out_dir / "profile", log
                ))  # fmt: skip
            finally:
                server.stop()
        # The sections that start servers of their own, on the relay CPU (or on both: cpus).
        for name in ("upstream_client", "encodings", "paths"):
            await measure(name, lambda name=name: section(name).bench(upstream, plan, log_dir, server_cpus, log))
        await measure("workers", lambda: section("workers").bench(upstream, plan, log_dir, cpus, log))
        await measure("burst", lambda: section("burst").bench(upstream, plan.repeats, log_dir, cpus, log))
    finally:
        await upstream.aclose()

    if baseline:
        await measure("baseline", lambda: section("ab").bench(baseline, plan.cpu_rounds))
    await measure("local", lambda: local_bench.bench(
        plan.local_runs, plan.local_max_tokens, log_dir, log, cancel_runs=plan.local_cancel_probes
    ))  # fmt: skip

    async def parse() -> Any:
        return parsers.bench(HERE / ".cache" / "fixtures", plan.parser_repeats, plan.parser_min_s, log)

    await measure("parsers", parse)

    async def soak() -> Any:
        module = section("soak")
        return await module.bench(module.QUICK_S if plan.name == "quick" else module.FULL_S, log_dir, server_cpus, log)

    await measure("soak", soak)
    await measure("faults", lambda: asyncio.to_thread(section("faults").bench, log_dir, log))
    await measure("abuse", lambda: section("abuse").bench(log_dir, server_cpus, log))


def _save(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, fewer repeats (~4 min)")
    parser.add_argument("--only", help=f"comma-separated sections of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, help="output folder (default bench/, or bench/.cache/quick with --quick)")
    parser.add_argument("--no-install", action="store_true", help="do not pip/npm install the bench dependencies")
    parser.add_argument("--report-only", action="store_true", help="re-render from the output folder's results.json")
    parser.add_argument(
        "--baseline", metavar="REV", help="a git revision to measure plain-text CPU per token against, in this run"
    )
    args = parser.parse_args()
    out_dir: Path = args.out or (HERE / ".cache" / "quick" if args.quick else HERE)

    if args.report_only:
        from . import report

        results = json.loads((out_dir / "results.json").read_text())
        print(report.write(results, out_dir))
        return 0

    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if not args.no_install:
        install()

    import uvloop

    from . import relay, report

    plan = relay.QUICK if args.quick else relay.FULL
    cpus = pinning()
    if cpus[1]:
        os.sched_setaffinity(0, cpus[1])
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 16384), hard), hard))

    from dataclasses import asdict

    results: dict[str, Any] = {
        "plan": asdict(plan),
        "sections": sections,
        "started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }
    # A partial run (--only) keeps the other sections of the last results.json in the same folder.
    previous = out_dir / "results.json"
    if args.only and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("plan", {}).get("name") == plan.name:
            # The header keeps the whole run's date; the sections measured again are named in it.
            rerun = {**old.get("rerun", {}), **{name: results["started"] for name in sections}}
            results = {
                **old, **results, "started": old.get("started", results["started"]), "rerun": rerun,
                "sections": old.get("sections", sections), "loadavg": old.get("loadavg", {}),
                "steal": old.get("steal", {}), "section_started": old.get("section_started", {}),
            }  # fmt: skip
    started = time.monotonic()
    log(f"bench ({plan.name}): {', '.join(sections)} -> {out_dir}")
    try:
        uvloop.run(run(sections, plan, out_dir, results, cpus, args.baseline))
    finally:
        results["elapsed_s"] = time.monotonic() - started
        _save(results, out_dir)
        if "machine" in results:
            path = report.write(results, out_dir)
            log(f"wrote {path} in {results['elapsed_s'] / 60:.1f} min")
    if results.get("failed"):
        log(f"failed sections: {', '.join(results['failed'])}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
