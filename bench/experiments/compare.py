"""Measure the fastpath prototypes against tokenwire as it is: CPU per relayed token, p50/p99.

    python -m bench.experiments.compare [--streams 200] [--rounds 3] [--measure 4]

Same harness as bench/ (fake upstream + load generator on one core, each server on the other);
rounds interleave the variants.  CPU per token (server CPU time / tokens relayed in the window) is
the number that noise from other processes disturbs least.  Writes bench/experiments/RESULTS.md
(or ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

from .. import servers
from ..loadgen import Target, run_streams
from ..upstream import FakeUpstream

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "as is": "",
    "+store": "store",
    "+send": "send",
    "+stall": "stall",
    "+upstream": "upstream",
    "all four": "all",
}


def variant_server(name: str, variants: str, upstream_url: str) -> servers.Server:
    port = servers.free_port()
    argv = [
        sys.executable, "-m", "bench.experiments.fastpath", "--variants", variants,
        "--base-url", upstream_url, "--port", str(port),
    ]  # fmt: skip
    return servers.Server(name, argv, port)


async def main(streams_levels: list[int], rounds: int, measure: float, only: list[str] | None = None) -> str:
    variants = {k: v for k, v in VARIANTS.items() if not only or k in only}
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus, harness = ({cpus[0]}, {cpus[1]}) if len(cpus) > 1 else (None, None)
    if harness:
        os.sched_setaffinity(0, harness)
    upstream = FakeUpstream()
    await upstream.start()
    group = [variant_server(name, v, upstream.base_url) for name, v in variants.items()]
    log_dir = HERE.parent / ".cache" / "experiments"
    await asyncio.gather(*(asyncio.to_thread(s.start, cpus=server_cpus, log_dir=log_dir) for s in group))
    rows: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        for level in streams_levels:
            for r in range(rounds):
                for server in group:
                    result = await run_streams(
                        Target(server.name, server.port), level, 20, ramp_s=1.0, settle_s=1.0, measure_s=measure,
                        server_pid=server.pid,
                    )  # fmt: skip
                    us = result.server_cpu / result.window_tokens_per_s * 1e6 if result.window_tokens_per_s else float("nan")
                    row = {
                        "us_per_token": us, "p50": result.percentile_ms(50), "p99": result.percentile_ms(99),
                        "cpu": result.server_cpu, "other": result.other_cpu, "failed": result.failed,
                    }  # fmt: skip
                    rows.setdefault((level, server.name), []).append(row)
                    print(
                        f"[{time.strftime('%H:%M:%S')}] {level} streams {server.name:<10} round {r + 1}: "
                        f"{us:6.1f} us/token  p50 {row['p50']:.2f} ms  p99 {row['p99']:.2f} ms  cpu {row['cpu']:.0%}  "
                        f"other {row['other']:.0%}" + (f"  FAILED {result.failed}" if result.failed else ""),
                        flush=True,
                    )
                    upstream.forget()
                    await asyncio.sleep(0.5)
    finally:
        for s in group:
            s.stop()
        await upstream.aclose()
    lines = [
        "# Hot-path prototypes (bench/experiments/fastpath.py) vs tokenwire as it is",
        "",
        f"{rounds} interleaved rounds per cell, 20 tokens/s per stream, {measure:g} s window; medians. "
        "CPU per token = server CPU time / tokens relayed in the window. Each `+x` row is tokenwire with "
        "that one patch; `all four` has every patch.",
        "",
        "| streams | variant | CPU µs/token | vs as is | p50 ms | p99 ms | server CPU | other load |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for level in streams_levels:
        base = statistics.median(x["us_per_token"] for x in rows[(level, "as is")])
        for name in variants:
            rs = rows[(level, name)]
            us = statistics.median(x["us_per_token"] for x in rs)
            lines.append(
                f"| {level} | {name} | {us:.1f} | {us / base - 1:+.0%} | {statistics.median(x['p50'] for x in rs):.2f} | "
                f"{statistics.median(x['p99'] for x in rs):.2f} | {statistics.median(x['cpu'] for x in rs):.0%} | "
                f"{statistics.median(x['other'] for x in rs):.0%} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="200", help="comma-separated stream counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--measure", type=float, default=4.0)
    parser.add_argument("--only", help=f"comma-separated variants of: {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    import uvloop

    only = [x.strip() for x in args.only.split(",")] if args.only else None
    text = uvloop.run(main([int(x) for x in args.streams.split(",")], args.rounds, args.measure, only))
    args.out.write_text(text)
    print(text)
