"""RESULTS.md and the PNG plots, from the results dict that ``python -m bench`` saves as JSON.

``python -m bench --report-only`` re-renders them from ``results.json`` without running anything.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

RELAYS = ("tokenwire", "tutorial", "sse-starlette")
BASELINES = ("tutorial", "sse-starlette")
LABELS = {
    "loopback": "loopback floor (no relay)",
    "tokenwire": "tokenwire",
    "tutorial": "tutorial (StreamingResponse + httpx)",
    "sse-starlette": "sse-starlette + httpx",
}
COLORS = {"loopback": "#999999", "tokenwire": "#1f77b4", "tutorial": "#d62728", "sse-starlette": "#ff7f0e"}


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(baseline: float, ours: float) -> str:
    """How many times better tokenwire is (baseline / tokenwire), for "lower is better" numbers."""
    if not ours or math.isnan(ours) or math.isnan(baseline):
        return "–"
    return f"{baseline / ours:.2f}×"


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.0%}"


# -- sections -----------------------------------------------------------------------------


def _machine(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    v = m["versions"]
    clock = m["clock"]
    pin = r.get("pinning", {})
    lines = [
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['memory_gib']} GiB RAM, "
        f"Linux {m['kernel']}",
        f"- Python {m['python']}; uvicorn {v.get('uvicorn')} (uvloop {v.get('uvloop')}, httptools "
        f"{v.get('httptools')}); starlette {v.get('starlette')}; fastapi {v.get('fastapi')}; sse-starlette "
        f"{v.get('sse-starlette')}; httpx {v.get('httpx')} (httpcore {v.get('httpcore')}); httpx-sse "
        f"{v.get('httpx-sse')}; llama-cpp-python {v.get('llama_cpp_python')}",
        f"- node {v.get('node')}; eventsource-parser {v.get('npm eventsource-parser', '–')} and "
        f"{v.get('npm eventsource-parser-4', '–')}",
        f"- Pinning: relay servers on CPU {pin.get('server', '–')}, fake upstream + load generator on CPU "
        f"{pin.get('harness', '–')} (local model: both CPUs)",
        f"- Clock: `time.monotonic_ns` is `{clock['clock']}`, one clock for all processes: a child's reading "
        f"fell between two of ours {clock['child_reading_between_ours']}/{clock['rounds']} times "
        f"({'comparable' if clock['comparable'] else 'NOT comparable'})",
    ]
    loads = r.get("loadavg", {})
    if loads:
        steal = r.get("steal", {})
        started = r.get("section_started", {})
        text = ", ".join(
            f"{k}" + (f" at {started[k]}" if k in started else "") + f": {v}"
            + (f" (steal {steal[k]:.0%})" if k in steal else "")
            for k, v in loads.items()
        )
        lines.append(
            f"- Load average (1 min) when each section started, and the hypervisor's CPU steal during it — "
            f"{text}. This 2-core VM may be shared with other work: it shows up as noise, mostly in p99 and max."
        )
    return lines + [""]


def _method(r: dict[str, Any]) -> list[str]:
    plan = r["plan"]
    return [
        "## Method",
        "",
        f"Mode **{plan['name']}**: {plan['repeats']} repeat(s) per latency point. Streams "
        f"start evenly over {plan['ramp_s']:g} s; the measurement window opens {plan['settle_s']:g} s after "
        f"every stream has had its first token and lasts {plan['measure_s']:g} s{_long_windows(r)}; only tokens *written by the "
        "upstream* inside it count, and each stream ends once it has received a token written after it (so "
        "every window token is counted, however late). Connection set-up costs a relay far more than a "
        "token and is left out. Rounds interleave the relays so that drifting machine noise hits all alike"
        + (", each round starting with the next relay in turn. " if r.get("latency", {}).get("rotated") else ". ")
        + "A relay that cannot keep up shows it as latency growing with the window, not as lost tokens.",
        "",
        "- **Fake upstream** (`bench/upstream.py`): OpenAI-compatible `POST /v1/chat/completions`, raw "
        "HTTP/1.1 on asyncio protocols, chunked, keep-alive. Each token's text is `@` + the 20-digit "
        "`time.monotonic_ns()` of its write; per-stream timers keep the rate without drift. It records "
        "when each request's connection is closed by the relay (`closed_ns`).",
        "- **Load generator** (`bench/loadgen.py`): one asyncio protocol per stream with httptools' C "
        "parser; one clock reading per socket read; latency = read time − write time of every token in "
        "the read. It shares one process and one uvloop loop with the fake upstream (CPU "
        f"{r.get('pinning', {}).get('harness', '–')}). The **loopback floor** is the same generator "
        "pointed straight at the fake upstream.",
        "- **Relays** (`bench/servers.py`): each a single uvicorn process (uvloop + httptools, log level "
        "warning, no access log) pinned to the other CPU, relaying to the same fake upstream: "
        "`tokenwire serve --provider openai`, `bench/baselines/tutorial.py` (FastAPI `StreamingResponse` "
        "+ httpx, the tutorial way) and `bench/baselines/sse_starlette.py` (`EventSourceResponse` + httpx). "
        "Both baselines parse each upstream chunk and re-encode a small JSON event, as tokenwire does.",
        "- **Percentiles** are nearest-rank over all tokens of all repeats of a point together (per-run "
        "figures are in `results.json`); the other columns are medians over repeats. Server CPU = the server process's CPU time / window time (100% = one core); CPU µs/token = "
        "that / tokens relayed per second, the figure noise disturbs least (meaningless once a relay "
        "saturates: then its backlog drains after the window). *Other load* = CPU used meanwhile by every "
        "other process on the machine (other people's work, the kernel, loopback networking), in cores: the "
        "noise this number carries. *Late streams* had no first token when the window opened (5 s after the "
        "ramp): a saturated relay.",
        "",
    ]


def _long_windows(r: dict[str, Any]) -> str:
    """The levels whose window was stretched so that a run has at least ``min_samples`` tokens."""
    windows = (r.get("latency") or {}).get("measure_s", {})
    longer = [(level, s) for level, s in windows.items() if s > r["plan"]["measure_s"]]
    if not longer:
        return ""
    at = ", ".join(f"{s:g} s at {level} stream{'s' if level != '1' else ''}" for level, s in longer)
    return f" ({at}: at least {r['plan']['min_samples']} tokens a run, so that p99 is not one run's maximum)"


def _latency(r: dict[str, Any]) -> list[str]:
    lat = r.get("latency")
    if not lat:
        return []
    lines = [
        f"## Added latency per token (upstream write → client parse), {lat['rate']:g} tokens/s per stream",
        "",
        "| streams | relay | p50 ms | p99 ms | p99.9 ms | max ms | tokens/s | server CPU | CPU µs/token | other "
        "load | samples | failed / late streams | tokenwire better by (p50 / p99) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level, rows in lat["levels"].items():
        tw = rows.get("tokenwire")
        for name, row in rows.items():
            ratio = ""
            if name in BASELINES and tw:
                ratio = f"{_ratio(row['p50_ms'], tw['p50_ms'])} / {_ratio(row['p99_ms'], tw['p99_ms'])}"
            cpu = "" if name == "loopback" else _pct(row["server_cpu"])
            per_token = "" if name == "loopback" else _f(row.get("server_us_per_token", math.nan), 0)
            lines.append(
                f"| {level} | {LABELS.get(name, name)} | {_f(row['p50_ms'])} | {_f(row['p99_ms'])} | "
                f"{_f(row['p999_ms'])} | {_f(row['max_ms'])} | {_f(row['tokens_per_s'], 0)} | {cpu} | {per_token} | "
                f"{_pct(row.get('other_cpu', math.nan))} | {row['samples']:,} | {row['failed_streams']} / "
                f"{row.get('late_starts', 0)} | {ratio} |"
            )
    lines += ["", "![p50 and p99 by concurrency](plots/latency.png)", "", "![CDF](plots/latency_cdf.png)", ""]
    return lines


def _ceiling(r: dict[str, Any]) -> list[str]:
    c = r.get("ceiling")
    if not c:
        return []
    tut = c["targets"].get("tutorial", {}).get("ceiling_tokens_per_s") or math.nan
    lines = [
        "## Throughput ceiling",
        "",
        f"{c['streams']} concurrent streams; the offered rate rises geometrically (then bisects) until p99 "
        f"reaches {c['p99_limit_ms']:g} ms, a stream fails, or less than 90% of the offered tokens get "
        "through. The ceiling is the tokens/s relayed at the last passing step. A step fails only if it "
        "fails twice in a row"
        + (
            f"; one that fails while other processes on the machine use {c['noise_cores']:.0%} of a core or "
            f"more is tried up to {c['noisy_retries']} more times, so that a busy spell of the shared machine "
            "does not end the search."
            if "noisy_retries" in c
            else "."
        ),
        "",
        "| relay | ceiling tokens/s | p99 ms there | server CPU there | first failing offer | vs tutorial |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in c["targets"].items():
        fail = row["first_failure_offered"]
        fail_text = "none up to the search max" if fail is None else _f(fail, 0)
        vs = "" if name in ("loopback", "tutorial") else (f"{row['ceiling_tokens_per_s'] / tut:.2f}×" if tut else "–")
        cpu = "" if name == "loopback" else _pct(row["server_cpu"])
        lines.append(
            f"| {LABELS.get(name, name)} | {_f(row['ceiling_tokens_per_s'], 0)} | {_f(row['p99_ms'])} | {cpu} | "
            f"{fail_text} | {vs} |"
        )
    if "loopback" not in c["targets"]:
        lines.append("| loopback floor (no relay) | not searched in this mode | | | | |")
    lines += [
        "",
        "A relay's ceiling cannot show above the loopback floor's: there the harness itself is the limit.",
        "",
        "![ceiling](plots/ceiling.png)",
        "",
    ]
    return lines


def _cancel(r: dict[str, Any]) -> list[str]:
    c = r.get("cancel")
    if not c:
        return []
    lines = [
        "## Cancellation latency (client closes its socket → upstream sees the relay's socket close)",
        "",
        f"{c['probes']} probes per cell, 4 in flight. *Mid-stream*: abort after the 3rd token of a 50 tokens/s "
        "stream. *Before first token*: the upstream holds the first token for 10 s; abort 20 ms after it "
        f"received the request. *Load*: {c['load_streams']} background streams × 20 tokens/s on the same relay (a "
        "load every relay here sustains; at 500 streams all of them saturate, see the latency table, and "
        "cancellation then waits in the same queue as the tokens). "
        "The *queued* phase exists only for the local provider (the openai provider has no queue): see [Local model](#local-model) for cancellation through it in every phase.",
        "",
        "| relay | condition | phase | n | p50 ms | p99 ms | max ms | not closed in 3 s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, rows in c["targets"].items():
        for key, row in rows.items():
            if key == "load/background":
                continue
            condition, phase = key.split("/", 1)
            lines.append(
                f"| {LABELS.get(name, name)} | {condition} | {phase} | {row['n']} | {_f(row['p50_ms'])} | "
                f"{_f(row['p99_ms'])} | {_f(row['max_ms'])} | {row['not_closed']} |"
            )
    lines += ["", "Background load meanwhile (per-token latency of the 20 tokens/s streams):", ""]
    lines += ["| relay | p50 ms | p99 ms | tokens/s | failed streams |", "|---|---:|---:|---:|---:|"]
    for name, rows in c["targets"].items():
        bg = rows.get("load/background")
        if bg:
            lines.append(
                f"| {LABELS.get(name, name)} | {_f(bg['p50_ms'])} | {_f(bg['p99_ms'])} | {_f(bg['tokens_per_s'], 0)} | "
                f"{bg['failed_streams']} |"
            )
    return lines + ["", "![cancellation](plots/cancel.png)", ""]


def _memory(r: dict[str, Any]) -> list[str]:
    m = r.get("memory")
    if not m:
        return []
    lines = [
        f"## Memory per open stream ({m['streams']} concurrent streams)",
        "",
        "Fresh server, warmed with 50 short streams; RSS (`VmRSS`) before, and the highest of four readings "
        "while every stream is open and has had its first token (1 token/s each); the difference divided by "
        "the streams. *Start CPU*: the server's CPU time while the streams opened, per stream (request, "
        "upstream connection, first token). Then all clients abort at once: how long until the upstream saw "
        "every socket close.",
        "",
        "| relay | RSS before MiB | RSS with streams MiB | streams | KiB per stream | start CPU ms/stream | mass abort: "
        "all closed ms | KiB/stream vs tokenwire |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    tw = m["targets"].get("tokenwire", {}).get("kib_per_stream", math.nan)
    for name, row in m["targets"].items():
        vs = _ratio(row["kib_per_stream"], tw) if name in BASELINES else ""
        lines.append(
            f"| {LABELS.get(name, name)} | {_f(row['rss_before_kib'] / 1024, 1)} | {_f(row['rss_during_kib'] / 1024, 1)} "
            f"| {row['streams_ready']} | {_f(row['kib_per_stream'], 1)} | {_f(row.get('start_cpu_ms', math.nan))} | "
            f"{_f(row['mass_abort_all_closed_ms'], 0)}"
            f"{' (' + str(row['mass_abort_not_closed']) + ' not closed)' if row['mass_abort_not_closed'] else ''} | {vs} |"
        )
    return lines + ["", "![memory](plots/memory.png)", ""]


def _local(r: dict[str, Any]) -> list[str]:
    loc = r.get("local")
    if not loc:
        return []
    if "error" in loc:
        return ["## Local model", "", f"Not measured: {loc['error']}", ""]
    lines = [
        "## Local model",
        "",
        f"{loc['model']}, {loc['threads']} threads, {loc['max_tokens']} max tokens, temperature 0, seed 1; "
        f"median of {loc['runs']} run(s) after a warm-up. Same text both ways: **{loc['same_text']}**.",
        "",
        "| path | TTFT ms | decode tokens/s (median) | best run | end-to-end tokens/s | each run (decode tokens/s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in ("direct", "tokenwire"):
        row = loc[name]
        label = "llama-cpp-python directly" if name == "direct" else "through tokenwire (HTTP + SSE)"
        runs = ", ".join(f"{x['decode_tokens_per_s']:.0f}" for x in row["runs"])
        lines.append(
            f"| {label} | {_f(row['ttft_ms'], 0)} | {_f(row['decode_tokens_per_s'], 1)} | "
            f"{_f(row.get('best_decode_tokens_per_s', math.nan), 1)} | {_f(row['e2e_tokens_per_s'], 1)} | {runs} |"
        )
    lines += [
        "",
        f"tokenwire / direct: decode {loc['decode_ratio']:.1%} (medians), {loc.get('best_decode_ratio', math.nan):.1%} "
        f"(best runs); end to end {loc['e2e_ratio']:.1%}. llama.cpp's threads wait for each other at every step, so "
        "any other process on the machine slows a run a lot, whichever path it took: the runs alternate, and the "
        "spread between them is that noise.",
        "",
    ]
    local = loc.get("cancel")
    if local:
        lines += [
            "### Cancellation through the local provider, every phase",
            "",
            "Three streams: A generating, B queued 1st, C queued 2nd. Abort B (*queued*), A after its 3rd token "
            "(*mid-stream*), or A while it evaluates a ~1,500-token prompt (*before first token*); the latency runs "
            "from the abort to C parsing its `queued` event with position 1 (the relay noticed, the job left the "
            "queue or llama.cpp stopped mid-step, the next job started). The model keeps both cores busy meanwhile: "
            "this is cancellation under load.",
            "",
            "| phase | n | p50 ms | p99 ms | max ms | void (a token came first) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for phase, row in local.items():
            lines.append(
                f"| {phase} | {row['n']} | {_f(row.get('p50_ms', math.nan))} | {_f(row.get('p99_ms', math.nan))} | "
                f"{_f(row.get('max_ms', math.nan))} | {row['void']} |"
            )
        lines.append("")
    by_ubatch = loc.get("abort_by_ubatch")
    if by_ubatch:
        lines += [
            "### Stopping a prompt evaluation, by `n_ubatch` (`bench/local_abort.py`)",
            "",
            f"llama-cpp-python directly, the ~{by_ubatch[0]['prompt_tokens']:,}-token prompt above: its speed "
            "evaluated whole, and the time from setting the abort switch to `eval()` raising, aborted at a "
            "random point. llama.cpp polls the switch between graph nodes, and a graph covers `n_ubatch` tokens: "
            "LocalProvider uses 64 (llama.cpp's default is 512).",
            "",
            "| n_ubatch | prompt tokens/s | abort p50 ms | abort max ms | aborts |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in by_ubatch:
            lines.append(
                f"| {row['n_ubatch']} | {_f(row['prompt_tokens_per_s'], 0)} | {_f(row['abort_p50_ms'])} | "
                f"{_f(row['abort_max_ms'])} | {row['aborts']} |"
            )
        lines.append("")
    return lines


def _soak(r: dict[str, Any]) -> list[str]:
    soak = r.get("soak")
    if not soak:
        return []
    stores = soak["stores"]
    some = next((row for row in stores.values() if "error" not in row), None)
    lines = [
        "## Soak: RSS and open fds under churn",
        "",
        f"{soak['concurrency']} concurrent short streams ({soak['max_tokens']} tokens, 20 ms apart: "
        "`tokenwire serve --provider scripted`), each replaced by a new one as soon as it ends, for "
        f"{soak['duration_s']:g} s per store; one request in {soak['requests_per_connection']} asks "
        "`Connection: close`, so keep-alive connections and fresh ones both churn. The server's RSS "
        "(`VmRSS`) and open fds (`/proc/PID/fd`) are read every second; first, last and max are after "
        f"warm-up (the first {_f(some['flatness']['warmup_s'] if some else math.nan, 0)} s). *Flat*: the "
        "median RSS of the last third of the samples after warm-up exceeds that of the first third by at "
        f"most {soak['rss_slack_mib']:g} MiB + {soak['rss_slack_fraction']:.0%}, and the fds neither climb "
        "(medians, the same thirds) nor peak above the warm-up's maximum by more than "
        f"{soak['fd_slack']}. Errors: streams that did not end with `done` (non-200, no terminal event, "
        "`error`, timeout). "
        "`tests/test_soak.py` runs the same driver (`bench/soak.py`) for 60 s per store.",
        "",
        "| store | duration s | streams completed | streams/s | server CPU | errors "
        "| RSS MiB first / last / max | RSS medians MiB (early → late) | fds first / last / max | verdict |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|",
    ]
    for name, row in stores.items():
        if "error" in row:
            lines.append(f"| {name} | | | | | | | | | not measured: {row['error']} |")
            continue
        fl = row["flatness"]
        mib = lambda kib: _f(kib / 1024, 1)  # noqa: E731
        lines.append(
            f"| {name} | {row['duration_s']:g} | {row['completed']:,} | {_f(row['streams_per_s'], 0)} | "
            f"{_pct(row['server_cpu'])} | {row['errors']} | {mib(row['rss_first_kib'])} / "
            f"{mib(row['rss_last_kib'])} / {mib(row['rss_max_kib'])} | {mib(fl['rss_early_kib'])} → "
            f"{mib(fl['rss_late_kib'])} | {row['fds_first']} / {row['fds_last']} / {row['fds_max']} | "
            f"{'flat' if fl['flat'] else '**' + fl['verdict'] + '**'} |"
        )
    return lines + ["", "![soak](plots/soak.png)", ""]


def _faults(r: dict[str, Any]) -> list[str]:
    f = r.get("faults")
    if not f:
        return []
    if "error" in f:
        return ["## Faults", "", f"Not measured: {f['error']}", ""]
    ms = lambda v: "–" if v is None else _f(v, 0)  # noqa: E731
    s = lambda v: "–" if v is None else _f(v, 2)  # noqa: E731
    lines = [
        "## Faults",
        "",
        "`bench/faults.py` runs the scenarios of `tests/test_redis_promises.py` (`tests/fault_scenarios.py`): "
        "`tokenwire serve` processes (memory: one; Redis: two sharing one `redis-server`) and the tests' fake "
        f"upstream. **Cancels**: {f['cancels']} per store and path, 50 at a time, by DELETE on the replica "
        "running the stream, DELETE on the other one, or the client closing the connection; a fifth before the "
        f"first token ({f['cancel_before_first_token_s'][0]:g}-{f['cancel_before_first_token_s'][1]:g} s after "
        f"`start`; the upstream is silent for {f['first_token_delay_s']:g} s), the rest after "
        f"{f['cancel_after_tokens'][0]}-{f['cancel_after_tokens'][1]} tokens of a stream of one token every "
        f"{f['token_interval_ms']:g} ms; *lost* = the upstream request still open "
        f"{f['cancel_bound_s']:g} s after the cancel; *no terminal* = the response or log afterwards lacks its "
        "one terminal event. **Replica death**: SIGKILL the replica running "
        f"{f['streams']} resumable streams, resume each on the other (bound {f['replica_lost_bound_s']:g} s = "
        f"lease TTL + 1 s). **Redis restart**: {f['streams']} live streams, Redis down 2 s and back empty on "
        "the same port.",
        "",
        "| store | cancel path | lost / N | no terminal | before 1st token / mid-stream | finished first | "
        "upstream closed p50 / max ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for store, paths in f.get("cancel", {}).items():
        for path, row in paths.items():
            lines.append(
                f"| {store} | {path} | {row['lost']} / {row['n']} | {row['no_terminal']} | "
                f"{row['before_first_token']} / {row['mid_stream']} | {row['finished_first']} | "
                f"{ms(row['close_p50_ms'])} / {ms(row['close_max_ms'])} |"
            )
    death = f.get("replica_death")
    if death:
        lines += [
            "",
            "| replica death | resumes with a terminal event | kill → terminal p50 s | max s | terminal events |",
            "|---|---:|---:|---:|---|",
            f"| SIGKILL | {death['got_terminal']} / {death['n']} | {s(death['p50_s'])} | {s(death['max_s'])} | "
            f"{', '.join(f'{k} ×{v}' for k, v in death['terminals'].items()) or '–'} |",
        ]
    restart = f.get("redis_restart")
    if restart:
        lines += [
            "",
            "| Redis restart | completed | ended by a typed error | cut | new stream works after (per replica) |",
            "|---|---:|---:|---:|---|",
        ]
        for how, row in restart.items():
            typed = sum(row["typed"].values())
            kinds = f" ({', '.join(f'{k} ×{v}' for k, v in row['typed'].items())})" if typed else ""
            recovery = ", ".join(f"{k} {s(v)} s" for k, v in row["recovery_s"].items())
            label = "SHUTDOWN NOSAVE" if how == "shutdown" else "SIGKILL"
            lines.append(f"| {label} | {row['completed']} / {row['n']} | {typed}{kinds} | {row['cut']} | {recovery} |")
    return lines + [""]


def _abuse(r: dict[str, Any]) -> list[str]:
    a = r.get("abuse")
    if not a:
        return []
    mib = lambda kib: _f(kib / 1024, 1)  # noqa: E731
    counts = lambda c: ", ".join(f"{k} ×{v:,}" for k, v in sorted(c.items())) or "–"  # noqa: E731
    lines = [
        "## Abuse: slow and oversized clients",
        "",
        "`bench/abuse.py`: one `tokenwire serve --provider scripted` with `" + " ".join(a["server_flags"]) + "` "
        "(the deadlines shortened so that each attack lives through several within its phase; the other limits "
        f"at their defaults), one phase after another, {a['phase_s']:g} s each. **slowloris**: connections "
        "that send half a request head, then nothing; **slow bodies**: POSTs announcing 1000 bytes, sent 1 byte "
        "a second; both replaced as soon as the server closes them. **huge headers**: 8 at a time, a header "
        f"of up to {a['huge_max_mib']} MiB in 1 MiB writes, stopping when answered, again 100 ms later. "
        "**connection flood**: "
        "idle connections, the cap (2048) + 500, each reopened 100 ms after it is closed. Meanwhile probes, one "
        "at a time, each on a new connection, alternate `GET /healthz` and a 3-token `POST /api/stream` read to "
        "its end: answer times whatever the status, and the statuses. RSS: before the phase, its peak "
        f"(`VmHWM` reset at the start, and 50 ms samples), and {a['settle_s']:g} s after it.",
        "",
        "| phase | attack connections | how they ended | RSS MiB before / peak / after | "
        "healthz p50 / p99 ms | stream p50 / p99 ms | probe statuses |",
        "|---|---:|---|---|---:|---:|---|",
    ]
    for name, row in a["phases"].items():
        h, st = row["probes"]["healthz"], row["probes"]["stream"]
        statuses: dict[str, int] = {}
        for kind in (h, st):
            for k, v in kind["statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
        lines.append(
            f"| {name} | {row['attack']['opened']:,} | {counts(row['attack']['ended'])} | "
            f"{mib(row['rss_before_kib'])} / {mib(row['rss_peak_kib'])} / {mib(row['rss_after_kib'])} | "
            f"{_f(h['p50_ms'], 1)} / {_f(h['p99_ms'], 1)} | {_f(st['p50_ms'], 1)} / {_f(st['p99_ms'], 1)} | "
            f"{counts(statuses)} |"
        )
    return lines + [""]


PEERS_PY = [("tokenwire SSEDecoder", "httpx-sse")]
PEERS_JS = [
    ("tokenwire.js SSEParser", "eventsource-parser 3"),
    ("tokenwire.js SSEParser", "eventsource-parser 4"),
    ("tokenwire.js parseSSE (stream)", "EventSourceParserStream 3 (stream)"),
    ("tokenwire.js parseSSE (stream)", "EventSourceParserStream 4 (stream)"),
]


def _parsers(r: dict[str, Any]) -> list[str]:
    p = r.get("parsers")
    if not p:
        return []
    lines = [
        "## Parsers (MB/s, higher is better)",
        "",
        f"Fixtures from `bench/fixtures.py`, fed as {p['read_size'] // 1024} KiB reads; median of repeated passes "
        "after warm-up. Every parser of a pair yields the same events (checked here by digest, and by "
        "`tests/test_bench_fixtures.py`).",
        "",
    ]
    for lang, peers, title in (("python", PEERS_PY, "Python"), ("js", PEERS_JS, "JavaScript (node)")):
        table = p.get(lang, {})
        if not table:
            continue
        lines += [f"### {title}", "", "| fixture | size MB | ours | MB/s | peer | MB/s | ours / peer | same events |"]
        lines += ["|---|---:|---|---:|---|---:|---:|---|"]
        for fixture, row in table.items():
            for ours, peer in peers:
                if ours not in row or peer not in row:
                    continue
                a, b = row[ours], row[peer]
                lines.append(
                    f"| {fixture} | {p['sizes'].get(fixture, 0) / 1e6:.1f} | {ours} | {_f(a['mb_per_s'], 1)} | {peer} | "
                    f"{_f(b['mb_per_s'], 1)} | {a['mb_per_s'] / b['mb_per_s']:.2f}× | "
                    f"{'yes' if a['digest'] == b['digest'] else 'NO'} |"
                )
        lines.append("")
    return lines + ["![parsers](plots/parsers.png)", ""]


def _profile(r: dict[str, Any]) -> list[str]:
    prof = r.get("profile")
    if not prof:
        return []
    if "error" in prof:
        return ["## Profile", "", f"Not taken: {prof['error']}", ""]
    load = prof.get("load", {})
    lines = [
        f"## Profile: tokenwire at {load.get('streams', '?')} streams × 20 tokens/s",
        "",
        f"py-spy, {prof['rate']} Hz for {prof['duration_s']:g} s, non-blocking; {prof['samples']:,} non-idle samples "
        f"= {prof['busy_fraction']:.0%} of one core busy in Python-visible code (server CPU meanwhile "
        f"{_pct(load.get('server_cpu', math.nan))}, p99 {_f(load.get('p99_ms'))} ms). Shares are of the "
        f"non-idle samples. Raw stacks: `{Path(prof.get('raw', '')).name}` in the output's profile/ folder. "
        "Inclusive shares are lower bounds: py-spy loses the outer frames of many task steps started by the "
        "event loop's C code (those stacks begin at the coroutine).",
        "",
        "| self time, by package | share |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {share:.1%} |" for name, share in prof["packages"]]
    lines += ["", "| top functions by self time | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in prof["self"][:15]]
    lines += ["", "| top functions by inclusive time | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in prof["inclusive"][:30]]
    return lines + [""]


CLIENTS = {"tokenwire": "tokenwire's own", "httpx": "httpx", "aiohttp": "aiohttp"}


def _saturated(row: dict[str, Any], rate: float, level: str) -> bool:
    """A relay that fell behind in most rounds: streams late at the window, or under 95% of the offered
    tokens relayed.  (One round behind is as likely the machine's other load as the relay.)"""
    runs = row.get("runs") or [row]
    behind = [r for r in runs if r.get("late_starts") or r["tokens_per_s"] < 0.95 * rate * int(level)]
    return 2 * len(behind) > len(runs)


def _upstream_client(r: dict[str, Any]) -> list[str]:
    u = r.get("upstream_client")
    if not u:
        return []
    v = r.get("machine", {}).get("versions", {})
    lines = [
        f"## The upstream HTTP client: tokenwire's own, httpx {v.get('httpx', '')}, aiohttp {v.get('aiohttp', '')}",
        "",
        "`bench/upstream_client.py`: the openai provider as `tokenwire serve` runs it, once per HTTP client it "
        "can read its upstream with, each in a server of its own on the relay CPU; everything but the client is "
        "the same code (the provider reads every answer through one path, whichever client fetched it). httpx "
        "is set up as the provider sets up its own httpx client (HTTP/1.1, no connection cap, 32 idle "
        "connections); aiohttp runs through a small adapter in the bench (no connection cap). "
        f"{u['repeats']} round(s) per level, each measuring every client in turn, with the latency method above "
        f"({u['rate']:g} tokens/s per stream). *× own* = the client's CPU µs/token and p99 over the own "
        "client's; **saturated** marks a server that fell behind in most rounds (late streams, or under 95% of "
        "the offered tokens relayed), where CPU per token says little and latency is a backlog.",
        "",
        "| streams | client | p50 ms | p99 ms | p99.9 ms | tokens/s | server CPU | CPU µs/token | other load | "
        "failed / late streams | × own (CPU µs/token / p99) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for level, rows in u["levels"].items():
        own = rows.get("tokenwire")
        for name, row in rows.items():
            ratio = ""
            if own and name != "tokenwire":
                ratio = (
                    f"{row['server_us_per_token'] / own['server_us_per_token']:.2f}× / "
                    f"{row['p99_ms'] / own['p99_ms']:.2f}×"
                )
                state = "saturated" if _saturated(row, u["rate"], level) else f"{ratio.split(' / ')[0]} the CPU"
                verdicts.append(f"{CLIENTS.get(name, name)} at {level} streams: {state}")
            flag = " **saturated**" if _saturated(row, u["rate"], level) else ""
            lines.append(
                f"| {level} | {CLIENTS.get(name, name)}{flag} | {_f(row['p50_ms'])} | {_f(row['p99_ms'])} | "
                f"{_f(row['p999_ms'])} | {_f(row['tokens_per_s'], 0)} | {_pct(row['server_cpu'])} | "
                f"{_f(row['server_us_per_token'], 0)} | {_pct(row.get('other_cpu', math.nan))} | "
                f"{row['failed_streams']} / {row.get('late_starts', 0)} | {ratio} |"
            )
    if verdicts:
        lines += ["", "Against the own client: " + "; ".join(verdicts) + "."]
    return lines + [""]


def _baseline(r: dict[str, Any]) -> list[str]:
    b = r.get("baseline")
    if not b:
        return []
    from .ab import table

    return [
        f"## Plain text against {b['revision']}",
        "",
        f"`python -m bench --baseline {b['revision']}` (`make bench BASELINE={b['revision']}`): tokenwire at that revision "
        "and tokenwire now, both running at once, pinned to the relay CPU, measured one after the other in each of "
        f"{b['repeats']} rounds with the latency method above (plain text, 20 tokens/s per stream), so that a slow "
        "spell of the machine hits both. *CPU × the revision* is now's CPU µs/token over the revision's in the same "
        "round, the median over rounds.",
        "",
        *table(b),
        "",
    ]


def cpu_ratio(rows: dict[str, Any], name: str, base: str) -> float:
    """At one latency level, ``name``'s CPU µs per token over ``base``'s: the median of the rounds' ratios.

    A round runs both targets one after the other, so a slow spell of this shared machine
    hits a round's pair alike and cancels in its ratio; the median of those ratios is
    steadier than a ratio of the two medians, which pairs figures from different rounds.
    """
    pairs = [
        a["server_us_per_token"] / b["server_us_per_token"]
        for a, b in zip(rows[name]["runs"], rows[base]["runs"])
        if a["server_us_per_token"] > 0 and b["server_us_per_token"] > 0  # NaN compares false
    ]
    return statistics.median(pairs) if pairs else math.nan


def _side_by_side_table(section: dict[str, Any], code: bool) -> list[str]:
    """The table of a section measured with ``relay.side_by_side`` (``code``: names in backticks)."""
    lines = [
        "| streams in all | server | p50 ms | p99 ms | server CPU µs/token | CPU × |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for level, rows in section["levels"].items():
        for name, f in rows.items():
            shown = f"`{name}`" if code else name
            lines.append(
                f"| {level} | {shown} | {_f(f['p50_ms'])} | {_f(f['p99_ms'])} | {_f(f['server_us_per_token'], 0)} | "
                f"{cpu_ratio(rows, name, section['reference']):.2f} |"
            )
    return lines + [""]


def _side_by_side_goal(section: dict[str, Any] | None, goal: str, limit: float) -> list[tuple[str, str, bool | None]]:
    """Every server's CPU × over the section's reference, at every level, against ``limit``."""
    if not section:
        return []
    ratios = {
        f"{name} at {level}": cpu_ratio(rows, name, section["reference"])
        for level, rows in section["levels"].items()
        for name in rows
        if name != section["reference"]
    }
    text = ", ".join(f"{name} {ratio:.2f}×" for name, ratio in ratios.items())
    return [(goal, text, all(x <= limit for x in ratios.values()))]


def _encodings(r: dict[str, Any]) -> list[str]:
    e = r.get("encodings")
    if not e:
        return []
    return [
        "## Other APIs' wire formats",
        "",
        "`bench/encodings.py`: the same plain-text streams read through `/api/stream` (tokenwire's events, "
        "written as the log holds them), `/v1/chat/completions` (OpenAI's chunks) and `/api/chat` (the AI SDK's "
        "UI message chunks), both written from the log's events: one `tokenwire serve` per route, all three on "
        "the relay CPU and loaded *at the same time*, each with a third of the streams (so that whatever slows "
        "this shared machine slows all three alike: measured one after the other, a route's CPU per token moves "
        f"by 10% from one run to the next), in each of {e['repeats']} rounds, with the latency method above. "
        "*CPU ×* is the route's CPU µs/token over `/api/stream`'s in the same round, the median over rounds.",
        "",
        *_side_by_side_table(e, code=True),
    ]


def _paths(r: dict[str, Any]) -> list[str]:
    p = r.get("paths")
    if not p:
        return []
    return [
        "## The Redis store and a mounted relay",
        "",
        "`bench/paths.py`: the same plain-text streams through `tokenwire serve` with the memory store (the "
        "reference), `tokenwire serve --store redis://` (a `redis-server` of its own, whose CPU is not counted) "
        "and tokenwire's relay in a user's own FastAPI app on plain uvicorn (`bench/baselines/mounted.py`, "
        "README.md's example); all three on the relay CPU and loaded *at the same time*, a third of the streams "
        f"each, in each of {p['repeats']} rounds, with the latency method above (as in the previous section). "
        "*CPU ×* is the server's CPU µs/token over the reference's in the same round, the median over rounds.",
        "",
        *_side_by_side_table(p, code=False),
    ]


def _workers(r: dict[str, Any]) -> list[str]:
    w = r.get("workers")
    if not w:
        return []
    lines = [
        "## Workers",
        "",
        f"`bench/workers.py`: `tokenwire serve --workers N --store redis://`, nothing pinned: the workers, the fake "
        f"upstream and the load generator share this machine's {w['cpus']} cores. The ceiling search is the ceiling "
        f"section's ({w['streams']} streams).",
        "",
        "| workers | ceiling tokens/s | p99 ms there | server CPU there (cores) |",
        "|---|---:|---:|---:|",
    ]
    for name, t in w["targets"].items():
        lines.append(
            f"| {name} | {_f(t['ceiling_tokens_per_s'], 0)} | {_f(t['p99_ms'])} | {_f(t['server_cpu'])} |"
        )
    redis_us = w.get("redis_us_per_token")
    if redis_us:
        lines += [
            "",
            f"`redis-server` used {_f(w['redis_cpu'])} of a core while one worker relayed "
            f"{_f(w['redis_cpu'] / redis_us * 1e6, 0)} tokens/s (500 streams offered 20 tokens/s each): "
            f"{_f(redis_us, 1)} µs of its CPU per token. Each worker is its own process with its own event loop, and "
            "a token costs a worker the same CPU whichever worker runs it; so on a box with cores to spare (the load "
            "generator elsewhere) the ceiling grows with the workers until Redis's single thread is busy, near "
            f"{_f(1e6 / redis_us, 0)} tokens/s by that figure.",
        ]
    return lines + [""]


def _burst(r: dict[str, Any]) -> list[str]:
    b = r.get("burst")
    if not b:
        return []
    lines = [
        "## Bursts of new streams",
        "",
        f"`bench/burst.py`: {b['background']} streams of 20 tokens/s run; then N streams start at once (their "
        "connections opened together). *TTFT* is each burst stream's time from its request's write to its first "
        f"token; *background p99* is the latency of the running streams' tokens written in the {b['window_s']:g} s "
        "from the burst's start. *Unpinned*: relay, fake upstream and load generator share both cores, as on a box "
        "one deploys to; *pinned*: the relay on one CPU, the harness on the other. "
        f"{b['rounds']} rounds per point, the targets in turns; percentiles over all rounds' streams and tokens.",
        "",
        "| mode | N at once | target | TTFT p50 ms | TTFT p99 ms | background p50 ms | background p99 ms | no first token |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for mode, levels in b["modes"].items():
        for level, targets in levels.items():
            for name, f in targets.items():
                lines.append(
                    f"| {mode} | {level} | {name} | {_f(f['ttft_p50_ms'], 1)} | {_f(f['ttft_p99_ms'], 1)} | "
                    f"{_f(f['background_p50_ms'])} | {_f(f['background_p99_ms'])} | {f['no_first_token']} |"
                )
    return lines + [""]


def _burst_goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    unpinned = (r.get("burst") or {}).get("modes", {}).get("unpinned", {})
    out: list[tuple[str, str, bool | None]] = []
    at_200 = unpinned.get("200", {}).get("tokenwire")
    if at_200:
        p50 = at_200["ttft_p50_ms"]
        out.append(("TTFT p50 ≤ 20 ms, 200 streams started at once, unpinned", f"{_f(p50, 1)} ms", p50 <= 20))
    at_500 = unpinned.get("500", {}).get("tokenwire")
    if at_500:
        p99 = at_500["background_p99_ms"]
        out.append(
            ("running streams' p99 ≤ 5 ms during a 500-stream burst, unpinned", f"{_f(p99)} ms", p99 <= 5)
        )
    return out


def goals(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = _burst_goals(r)
    out += _side_by_side_goal(
        r.get("paths"), "Redis store and mounted relay ≤ 1.15× the memory store's CPU per token", 1.15
    )
    out += _side_by_side_goal(
        r.get("encodings"), "OpenAI and AI SDK formats ≤ 1.10× /api/stream's CPU per token", 1.10
    )
    b = r.get("baseline")
    if b:
        ratios = {level: cpu_ratio(rows, "now", b["revision"]) for level, rows in b["levels"].items()}
        text = ", ".join(f"{level} streams {ratio:.3f}×" for level, ratio in ratios.items())
        out.append((f"plain-text CPU per token within 5% of {b['revision']}", text, all(x <= 1.05 for x in ratios.values())))
    lat = r.get("latency")
    if lat:
        levels = lat["levels"]
        for level, limit in (("200", 2.0), ("500", 5.0)):
            tw = levels.get(level, {}).get("tokenwire")
            if tw:
                out.append((f"added latency p99 ≤ {limit:g} ms at {level} streams", f"{_f(tw['p99_ms'])} ms", tw["p99_ms"] <= limit))
        worse = []
        for level, rows in levels.items():
            tw = rows.get("tokenwire")
            if not tw:
                continue
            for name in BASELINES:
                b = rows.get(name)
                if b and (tw["p99_ms"] > b["p99_ms"] or tw["p50_ms"] > b["p50_ms"]):
                    worse.append(f"{level} streams vs {name} (p50 {_f(tw['p50_ms'])}/{_f(b['p50_ms'])}, p99 {_f(tw['p99_ms'])}/{_f(b['p99_ms'])})")
        out.append(("latency never worse than a baseline (p50 and p99)", "; ".join(worse) or "never worse", not worse))
    c = r.get("ceiling")
    if c:
        tw = c["targets"].get("tokenwire", {}).get("ceiling_tokens_per_s", 0.0)
        tut = c["targets"].get("tutorial", {}).get("ceiling_tokens_per_s", 0.0)
        floor = c["targets"].get("loopback", {}).get("ceiling_tokens_per_s", 0.0)
        note = f" (harness floor {_f(floor, 0)})" if floor else ""
        out.append(("throughput ceiling ≥ 20,000 tokens/s", f"{_f(tw, 0)} tokens/s{note}", tw >= 20_000))
        out.append(("ceiling ≥ 1.5× the tutorial's", f"{tw / tut:.2f}× ({_f(tut, 0)})" if tut else "–", bool(tut) and tw >= 1.5 * tut))
    cancel = r.get("cancel")
    if cancel and "tokenwire" in cancel["targets"]:
        rows = cancel["targets"]["tokenwire"]
        load_rows = {k: v for k, v in rows.items() if k.startswith("load/") and k != "load/background"}
        worst = max((v["p99_ms"] for v in load_rows.values()), default=math.nan)
        not_closed = sum(v["not_closed"] for v in rows.values() if "not_closed" in v)
        text = "openai: " + ", ".join(f"{k.split('/', 1)[1]} {_f(v['p99_ms'])} ms" for k, v in load_rows.items())
        local = (r.get("local") or {}).get("cancel") or {}
        if local:
            text += "; local: " + ", ".join(f"{phase} {_f(v.get('p99_ms', math.nan))} ms" for phase, v in local.items())
            worst = max([worst, *(v.get("p99_ms", math.inf) for v in local.values())])
        out.append(("cancellation p99 ≤ 5 ms under load, every phase",
                    text + (f"; {not_closed} not closed" if not_closed else ""), worst <= 5.0 and not not_closed))  # fmt: skip
    mem = r.get("memory")
    if mem and "tokenwire" in mem["targets"]:
        kib = mem["targets"]["tokenwire"]["kib_per_stream"]
        out.append(("≤ 64 KiB RSS per open stream", f"{_f(kib, 1)} KiB", kib <= 64))
    loc = r.get("local")
    if loc and "error" not in loc:
        out.append(("local model through tokenwire ≥ 95% of direct tokens/s",
                    f"decode {loc['decode_ratio']:.1%} (medians), {loc.get('best_decode_ratio', math.nan):.1%} (best runs); "
                    f"end to end {loc['e2e_ratio']:.1%}", loc["decode_ratio"] >= 0.95))  # fmt: skip
    p = r.get("parsers")
    if p:
        slower = []
        for lang, peers in (("python", PEERS_PY), ("js", PEERS_JS)):
            for fixture, row in p.get(lang, {}).items():
                for ours, peer in peers:
                    if ours in row and peer in row and row[ours]["mb_per_s"] < row[peer]["mb_per_s"]:
                        slower.append(f"{ours} < {peer} on {fixture} ({row[ours]['mb_per_s'] / row[peer]['mb_per_s']:.2f}×)")
        out.append(("each parser at least as fast as its peer", "; ".join(slower) or "all at least as fast", not slower))
    soak = r.get("soak")
    if soak:
        rows = soak["stores"]
        text = "; ".join(
            f"{name}: not measured ({row['error']})" if "error" in row
            else f"{name}: {row['flatness']['verdict']}, {row['errors']} errors" for name, row in rows.items()
        )
        met = all("error" not in row and row["flatness"]["flat"] and not row["errors"] for row in rows.values())
        goal = f"soak: RSS and fds flat over {soak['duration_s']:g} s of churn, no failed stream"
        out.append((goal, text, met))
    huge = (r.get("abuse") or {}).get("phases", {}).get("huge headers")
    if huge:
        growth = (huge["rss_peak_kib"] - huge["rss_before_kib"]) / 1024
        goal = "abuse: RSS grows by less than 50 MB under 8 concurrent 100 MiB headers"
        out.append((goal, f"+{growth:.1f} MiB", growth * 1024 * 1024 < 50e6))
    return out


def _goals(r: dict[str, Any]) -> list[str]:
    rows = goals(r)
    if not rows:
        return []
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for goal, measured, met in rows:
        lines.append(f"| {goal} | {measured} | {'yes' if met else 'no' if met is not None else '–'} |")
    return lines + [""]


def render(r: dict[str, Any]) -> str:
    plan = r["plan"]
    lines = [
        "# tokenwire benchmarks",
        "",
        f"Written by `python -m bench{' --quick' if plan['name'] == 'quick' else ''}` "
        f"(`make bench`) on {r.get('started', '?')}. "
        "Every number below was measured in that one run on the machine described"
        + (
            ", except the sections measured again later with `python -m bench --only …`: "
            + ", ".join(f"{name} on {at}" for name, at in r["rerun"].items())
            + "."
            if r.get("rerun")
            else f", in {r.get('elapsed_s', 0) / 60:.1f} min."
        ),
        "",
    ]
    if r.get("failed"):
        lines += [
            "**Sections that failed in this run** (their tables are missing; the log has the traceback): "
            + "; ".join(f"{name} ({error})" for name, error in r["failed"].items()),
            "",
        ]
    for section in (_goals, _machine, _method, _latency, _ceiling, _cancel, _memory, _upstream_client, _encodings, _paths, _workers, _burst, _baseline, _local, _parsers, _profile, _soak, _faults, _abuse):
        lines += section(r)
    return "\n".join(lines).rstrip() + "\n"


# -- plots --------------------------------------------------------------------------------


def plot(r: dict[str, Any], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    lat = r.get("latency")
    if lat:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        levels = [int(x) for x in lat["levels"]]
        for ax, key, title in ((axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")):
            for name in lat["levels"][str(levels[0])]:
                ys = [lat["levels"][str(level)][name][key] for level in levels]
                ax.plot(levels, ys, marker="o", label=LABELS.get(name, name), color=COLORS.get(name))
            ax.set_xlabel("concurrent streams (20 tokens/s each)")
            ax.set_ylabel(f"{title} added latency per token (ms)")
            ax.set_yscale("log")
            ax.set_title(f"{title} upstream write → client parse")
            ax.grid(True, which="both", alpha=0.3)
        axes[1].axhline(5, color="black", linestyle=":", linewidth=1)
        axes[0].legend(fontsize=8)
        save(fig, "latency.png")
        if lat.get("cdf"):
            fig, ax = plt.subplots(figsize=(7, 4))
            for name, q in lat["cdf"].items():
                ys = [i / (len(q) - 1) for i in range(len(q))]
                ax.plot(q, ys, label=LABELS.get(name, name), color=COLORS.get(name))
            ax.set_xscale("log")
            ax.set_xlabel("added latency per token (ms)")
            ax.set_ylabel("fraction of tokens")
            ax.set_title(f"latency distribution at {max(levels)} streams × 20 tokens/s")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, "latency_cdf.png")

    c = r.get("ceiling")
    if c:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, row in c["targets"].items():
            steps = sorted(row["steps"], key=lambda s: s["offered_per_s"])
            ax.plot([s["offered_per_s"] for s in steps], [s["p99_ms"] for s in steps], marker="o",
                    label=LABELS.get(name, name), color=COLORS.get(name))  # fmt: skip
        ax.axhline(c["p99_limit_ms"], color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"offered tokens/s ({c['streams']} streams)")
        ax.set_ylabel("p99 added latency (ms)")
        ax.set_title("throughput ceiling search")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "ceiling.png")

    cancel = r.get("cancel")
    if cancel:
        keys = [k for k in next(iter(cancel["targets"].values())) if k != "load/background"]
        names = list(cancel["targets"])
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            rows = cancel["targets"][name]
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [rows[k]["p99_ms"] for k in keys], width, label=f"{LABELS.get(name, name)} p99",
                   color=COLORS.get(name), alpha=0.5)  # fmt: skip
            ax.bar(xs, [rows[k]["p50_ms"] for k in keys], width, color=COLORS.get(name))
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(keys))], keys, fontsize=8)
        ax.set_ylabel("client abort → upstream closed (ms)")
        ax.set_yscale("log")
        ax.set_title("cancellation latency: solid p50, light p99; dotted line 5 ms")
        ax.axhline(5, color="black", linestyle=":", linewidth=1)
        ax.legend(fontsize=8)
        save(fig, "cancel.png")

    mem = r.get("memory")
    if mem:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(mem["targets"])
        ax.bar([LABELS.get(n, n) for n in names], [mem["targets"][n]["kib_per_stream"] for n in names],
               color=[COLORS.get(n) for n in names])  # fmt: skip
        ax.axhline(64, color="black", linestyle=":", linewidth=1)
        ax.set_ylabel(f"KiB RSS per open stream ({mem['streams']} streams)")
        ax.tick_params(axis="x", labelsize=7)
        save(fig, "memory.png")

    p = r.get("parsers")
    if p:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, lang in ((axes[0], "python"), (axes[1], "js")):
            table = p.get(lang, {})
            if not table:
                continue
            fixtures = list(table)
            parsers = list(next(iter(table.values())))
            width = 0.8 / len(parsers)
            for i, parser in enumerate(parsers):
                ax.bar([j + i * width for j in range(len(fixtures))], [table[f][parser]["mb_per_s"] for f in fixtures],
                       width, label=parser)  # fmt: skip
            ax.set_xticks([j + width * (len(parsers) - 1) / 2 for j in range(len(fixtures))], fixtures)
            ax.set_ylabel("MB/s")
            ax.set_title(f"{lang} SSE parsers")
            ax.legend(fontsize=7)
        save(fig, "parsers.png")

    soak = r.get("soak")
    measured = {name: row for name, row in (soak or {}).get("stores", {}).items() if "error" not in row}
    if measured:
        fig, (ax_rss, ax_fds) = plt.subplots(1, 2, figsize=(11, 4))
        for name, row in measured.items():
            t = [x[0] for x in row["samples"]]
            ax_rss.plot(t, [x[1] / 1024 for x in row["samples"]], label=name)
            ax_fds.plot(t, [x[2] for x in row["samples"]], label=name)
        warmup = next(iter(measured.values()))["flatness"]["warmup_s"]
        for ax, label in ((ax_rss, "server RSS (MiB)"), (ax_fds, "server open fds")):
            ax.axvline(warmup, color="black", linestyle=":", linewidth=1)
            ax.set_xlabel(f"seconds ({soak['concurrency']} streams at a time; dotted: end of warm-up)")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        ax_rss.set_ylim(bottom=0)
        ax_rss.set_title("soak: RSS")
        ax_fds.set_title("soak: open file descriptors")
        save(fig, "soak.png")
    return written


def write(r: dict[str, Any], out_dir: Path) -> Path:
    plot(r, out_dir / "plots")
    path = out_dir / "RESULTS.md"
    path.write_text(render(r))
    return path
