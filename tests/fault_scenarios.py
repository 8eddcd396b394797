"""The Redis store's fault scenarios (docs/deploy.md), run against real replicas (``replicas.py``):
cancels that cannot be lost, a replica that dies, Redis going away and coming back.

Each scenario returns a report of what it saw; ``tests/test_redis_promises.py`` asserts on it and
``bench/faults.py`` records it.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from fakes import run_async
from redis_server import RedisServer
from replicas import (
    CANCEL_AFTER_TOKENS,
    CANCEL_BEFORE_FIRST_TOKEN,
    CANCEL_BOUND,
    OUTAGE_ANSWER_BOUND,
    RECOVERY_BOUND,
    REPLICA_LOST_BOUND,
    aiter_events,
    brief,
    Event,
    expected_text,
    log_problems,
    new_client,
    ProfiledUpstream,
    read_until_end,
    Replica,
    Stalls,
    terminal_of,
    text_of,
)

# -- cancels that cannot be lost -----------------------------------------------------------

#: Each store's cancel paths: DELETE on the replica running the stream, DELETE on another one, and the
#: client closing the connection of a stream that is not resumable.
CANCEL_PATHS = {"memory": ("delete", "disconnect"), "redis": ("delete", "delete_elsewhere", "disconnect")}


@dataclass
class _CancelPlan:
    prompt: str
    post_to: Replica
    cancel_via: Replica  # where the DELETE goes (delete paths)
    log_from: Replica  # where the log is read afterwards
    resumable: bool
    after_tokens: int | None  # cancel once this many tokens arrived (mid-stream) …
    delay: float  # … or this long after the start event (before the first token)


@dataclass
class _Cancelled:
    plan: _CancelPlan
    stream_id: str = ""
    cancel_at: float | None = None
    delete_status: int | None = None
    delete_s: float | None = None  # how long the DELETE took to answer
    live: list[Event] = field(default_factory=list)  # what the POST's client read
    live_ended: bool = False
    log: list[Event] | None = None  # the whole log read afterwards (None: not kept, 404)
    log_ended: bool = False
    problem: str = ""


@dataclass
class CancelReport:
    store: str
    path: str
    streams: int = 0
    lost: int = 0  # upstream requests not ended within CANCEL_BOUND of their cancel
    no_terminal: int = 0  # cancelled streams whose response or log lacks its one terminal event
    not_cancelled: int = 0  # cancelled in flight, yet the terminal event is not done/cancelled
    no_upstream: int = 0  # cancelled before the relay opened its upstream request
    finished_first: int = 0  # the upstream had written everything before the cancel: not a test of it
    before_first_token: int = 0  # the log holds no token
    mid_stream: int = 0
    logs_read: int = 0
    close_ms: list[float] = field(default_factory=list)  # cancel -> upstream request ended
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        return (
            f"{self.store}/{self.path}: {self.lost}/{self.streams} cancels lost, {self.no_terminal} without "
            f"one terminal event, {self.not_cancelled} not ended as cancelled; phases: {self.before_first_token} "
            f"before the first token ({self.no_upstream} before the upstream request), {self.mid_stream} "
            f"mid-stream; {self.finished_first} finished before their cancel; {self.logs_read} logs read; "
            f"{self.elapsed_s:.1f} s"
        )


def cancel_streams(
    upstream: ProfiledUpstream,
    replicas: Sequence[Replica],
    path: str,
    *,
    streams: int = 500,
    concurrency: int = 50,
    seed: int = 12,
    stop_at_first_failure: bool = False,
) -> CancelReport:
    """Run ``streams`` streams, ``concurrency`` at a time, and cancel each at a random moment by ``path``.

    A fifth are cancelled before their first token (the upstream is silent for 2 s; the cancel comes 0-300
    ms after the ``start`` event), the rest mid-stream after 1-50 tokens of a fast upstream (one token
    every 5 ms from each of 50 streams, so that on Redis an append is nearly always in flight).
    ``delete`` sends DELETE to the replica that runs the stream, ``delete_elsewhere`` to another one,
    ``disconnect`` closes the connection of a stream that is not resumable.  Then each stream's log is
    read from the start (on another replica when there are several).  Streams go to the replicas in
    turn, and a new one starts as soon as one is done.  With
    ``stop_at_first_failure``, no stream starts after one went wrong (a test has seen enough).
    """
    if path not in ("delete", "delete_elsewhere", "disconnect"):
        raise ValueError(f"unknown cancel path {path!r}")
    if path == "delete_elsewhere" and len(replicas) < 2:
        raise ValueError("delete_elsewhere needs two replicas")
    rng = random.Random(f"{seed}-{path}")
    run = uuid.uuid4().hex[:8]
    plans = []
    for i in range(streams):
        here, there = replicas[i % len(replicas)], replicas[(i + 1) % len(replicas)]
        before_first = i % 5 == 0
        plans.append(
            _CancelPlan(
                prompt=f"{'slowfirst' if before_first else 'fast'}:cancel-{path}-{run}-{i}",
                post_to=here,
                cancel_via=there if path == "delete_elsewhere" else here,
                log_from=there,
                resumable=path != "disconnect",
                after_tokens=None if before_first else rng.randint(*CANCEL_AFTER_TOKENS),
                delay=rng.uniform(*CANCEL_BEFORE_FIRST_TOKEN) if before_first else 0.0,
            )
        )
    report = CancelReport(replicas[0].store.partition(":")[0], path)

    stalls = Stalls()

    async def scenario() -> None:
        slots = asyncio.Semaphore(concurrency)

        async def one(plan: _CancelPlan) -> None:
            async with slots:
                if report.problems and stop_at_first_failure:
                    return
                judged.append(plan.prompt)
                outcome = await _cancel_one(client, upstream, plan, path)
                _judge_cancel(upstream, outcome, report, (stalls, upstream.stalls))

        watcher = asyncio.create_task(stalls.watch())
        try:
            async with new_client() as client:
                await asyncio.gather(*(one(plan) for plan in plans))
        finally:
            watcher.cancel()

    judged: list[str] = []
    run_async(scenario)
    # A relay that opened an upstream request after its stream had ended would show here.
    prompts = judged

    def still_open() -> list[str]:
        return [
            p for p in prompts if (r := upstream.request_for(p)) is not None and upstream.ended_at(r) is None
        ]

    deadline = time.monotonic() + 2.0
    while still_open() and time.monotonic() < deadline:
        time.sleep(0.05)
    for prompt in still_open():
        report.problems.append(f"{prompt}: upstream request still open after the whole run")
    report.elapsed_s = time.monotonic() - report.started_at
    return report


async def _cancel_one(
    client: httpx.AsyncClient, upstream: ProfiledUpstream, plan: _CancelPlan, path: str
) -> _Cancelled:
    out = _Cancelled(plan)
    body = {"prompt": plan.prompt, "resumable": plan.resumable}
    try:
        async with asyncio.timeout(30.0):
            async with client.stream("POST", plan.post_to.url + "/api/stream", json=body) as response:
                if response.status_code != 200:
                    out.problem = f"POST answered {response.status_code}: {(await response.aread())[:200]!r}"
                    return out
                out.stream_id = response.headers["x-stream-id"]
                events = aiter_events(response)
                tokens = 0
                async for event in events:
                    out.live.append(event)
                    if plan.after_tokens is None:
                        if event.get("type") == "start":
                            break
                    elif event.get("type") == "token":
                        tokens += 1
                        if tokens >= plan.after_tokens:
                            break
                else:
                    out.problem = f"the stream ended before its cancel: {[brief(e) for e in out.live[-3:]]}"
                    return out
                if plan.delay:
                    await asyncio.sleep(plan.delay)  # the chosen moment, somewhere before the first token
                if path == "disconnect":
                    out.cancel_at = time.monotonic()  # leaving the block closes the connection mid-body
                else:
                    out.cancel_at, out.delete_status = await _delete(plan.cancel_via, out.stream_id)
                    out.delete_s = time.monotonic() - out.cancel_at
                    out.live_ended = await read_until_end(events, out.live, 10.0)
            # The log is read once the upstream request has ended, or its bound has passed: a reader
            # attached before the relay saw the disconnect would keep a non-resumable stream alive.
            deadline = out.cancel_at + CANCEL_BOUND + 0.25
            while time.monotonic() < deadline:
                request = upstream.request_for(plan.prompt)
                if request is not None and upstream.ended_at(request) is not None:
                    break
                await asyncio.sleep(0.01)
            async with client.stream("GET", f"{plan.log_from.url}/api/stream/{out.stream_id}") as response:
                if response.status_code == 200:
                    out.log = []
                    out.log_ended = await read_until_end(aiter_events(response), out.log, 10.0)
                elif response.status_code != 404 or plan.resumable:
                    out.problem = f"GET of the log answered {response.status_code}"
    except (httpx.HTTPError, TimeoutError) as exc:
        out.problem = f"{type(exc).__name__}: {exc}"
    return out


async def _delete(replica: Replica, stream_id: str) -> tuple[float, int]:
    """DELETE the stream on its own new connection; (when the request was sent, the status).

    Raw, not through httpx: under the load of 50 streams read by this process an httpx request
    spent up to hundreds of ms in this loop before its bytes left, which is the harness's time, not
    the server's (and on a reused connection uvicorn holds a request until the previous response's
    handler has returned, which was seen to take over a second after its last byte).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
    try:
        writer.write(
            f"DELETE /api/stream/{stream_id} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
        )
        sent_at = time.monotonic()
        await writer.drain()
        status_line = await reader.readline()
        return sent_at, int(status_line.split()[1])
    finally:
        writer.close()


def _judge_cancel(
    upstream: ProfiledUpstream, out: _Cancelled, report: CancelReport, stalls: Sequence[Stalls]
) -> None:
    report.streams += 1
    when = (
        "" if out.cancel_at is None else f", cancelled {out.cancel_at - report.started_at:.2f} s into the run"
    )
    name = f"{out.plan.prompt} ({out.stream_id or 'no stream'}{when})"
    if out.problem or out.cancel_at is None:
        report.problems.append(f"{name}: {out.problem}")
        return
    if out.delete_status not in (None, 204):
        report.problems.append(f"{name}: DELETE answered {out.delete_status}")
    request = upstream.request_for(out.plan.prompt)
    in_flight = True
    if request is None:
        report.no_upstream += 1
    else:
        ended = upstream.ended_at(request)
        completed = upstream.completed_at(request)
        if completed is not None and completed <= out.cancel_at:
            report.finished_first += 1
            in_flight = False
        elif ended is None or ended - out.cancel_at > CANCEL_BOUND:
            report.lost += 1
            late = "still open" if ended is None else f"ended {ended - out.cancel_at:.2f} s"
            written = len(request.token_times)
            answered = "" if out.delete_s is None else f", DELETE answered in {out.delete_s:.2f} s"
            stalled = max(s.longest(out.cancel_at, out.cancel_at + CANCEL_BOUND) for s in stalls)
            if stalled:
                answered += f"; meanwhile this test process stalled for {stalled:.2f} s"
            report.problems.append(
                f"{name}: upstream {late} after the cancel ({written} tokens written{answered})"
            )
        else:
            report.close_ms.append(max(0.0, ended - out.cancel_at) * 1000)
    logs = []
    if out.plan.resumable or out.live_ended:
        logs.append(("response", out.live, out.live_ended))
    if out.log is not None:
        report.logs_read += 1
        logs.append(("log", out.log, out.log_ended))
    complete = out.log if out.log is not None else out.live
    if any(e.get("type") == "token" for e in complete):
        report.mid_stream += 1
    else:
        report.before_first_token += 1
    no_terminal = False
    for what, events, ended_in_time in logs:
        problems = log_problems(events)
        if not ended_in_time:
            problems.append("did not end within 10 s")
        if problems:
            no_terminal = True
            report.problems.append(f"{name}: {what}: {'; '.join(problems)}")
            continue
        terminal = events[-1]
        if in_flight and not (terminal["type"] == "done" and terminal.get("finish_reason") == "cancelled"):
            report.not_cancelled += 1
            report.problems.append(f"{name}: {what} ends with {brief(terminal)}, not done/cancelled")
    report.no_terminal += no_terminal


# -- a replica dies -----------------------------------------------------------------------


class _Gate:
    """Opens once ``parties`` streams have each arrived (or failed: a stream that never gets there
    arrives in its ``finally``, so that a scenario never waits for it)."""

    def __init__(self, parties: int) -> None:
        self.left = parties
        self.open = asyncio.Event()

    def arrive(self) -> None:
        self.left -= 1
        if self.left <= 0:
            self.open.set()


async def _read_stream(
    client: httpx.AsyncClient, url: str, *, after: int | None = None, limit: float
) -> tuple[int, list[Event], bool]:
    """GET a stream (from ``after``): the status, the events read, whether it ended within ``limit`` s."""
    headers = {} if after is None else {"last-event-id": str(after)}
    events: list[Event] = []
    ended = False
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 200:
            with contextlib.suppress(httpx.HTTPError):
                ended = await read_until_end(aiter_events(response), events, limit)
        return response.status_code, events, ended


@dataclass
class KillReport:
    streams: int
    delays: list[float] = field(default_factory=list)  # s from the SIGKILL to the terminal event on a resume
    terminals: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        delays = sorted(self.delays)
        spread = f"p50 {delays[len(delays) // 2]:.2f} s, max {delays[-1]:.2f} s" if delays else "none"
        return (
            f"{len(delays)}/{self.streams} resumes got their terminal event ({spread} after the kill); "
            f"terminal events: {dict(self.terminals)}"
        )


def kill_and_resume(
    upstream: ProfiledUpstream, runner: Replica, other: Replica, *, streams: int = 50, watch_for: float = 3.0
) -> KillReport:
    """Start ``streams`` resumable streams on ``runner``, SIGKILL it mid-stream, resume each on ``other``.

    Each resume (Last-Event-ID: the last event its client saw) must answer 200, replay what ``runner``
    logged after it, and end with the one terminal event ``error``/``replica_lost`` (retryable) within
    REPLICA_LOST_BOUND of the kill; resumes are read until ``watch_for`` s past that bound, to measure
    how late a slow one is.  Then each log is read whole from the start on ``other``.
    """
    report = KillReport(streams)
    run = uuid.uuid4().hex[:8]
    limit = REPLICA_LOST_BOUND + watch_for

    async def one(client: httpx.AsyncClient, i: int, gate: _Gate, killed: asyncio.Future[float]) -> None:
        seen: list[Event] = []
        arrived = False
        name = f"stream {i}"
        try:
            body = {"prompt": f"slow:kill-{run}-{i}", "resumable": True}
            async with client.stream("POST", runner.url + "/api/stream", json=body) as response:
                if response.status_code != 200:
                    report.problems.append(f"{name}: POST answered {response.status_code}")
                    return
                stream_id = response.headers["x-stream-id"]
                name = f"stream {i} ({stream_id})"
                with contextlib.suppress(httpx.HTTPError):  # the runner dies under this response
                    async for event in aiter_events(response):
                        seen.append(event)
                        if not arrived and sum(e.get("type") == "token" for e in seen) >= 2:
                            arrived = True
                            gate.arrive()
            if terminal_of(seen) is not None:
                report.problems.append(f"{name}: the stream ended before the kill: {brief(seen[-1])}")
                return
            killed_at = await killed  # the connection may drop a moment before the kill is confirmed
            cursor = int(seen[-1]["_id"])
            url = f"{other.url}/api/stream/{stream_id}"
            status, resumed, _ = await _read_stream(
                client, url, after=cursor, limit=killed_at + limit - time.monotonic()
            )
            if status != 200:
                report.problems.append(f"{name}: the resume on {other.name} answered {status}")
                return
            problems = log_problems(resumed, after=cursor)
            terminal = terminal_of(resumed)
            if terminal is None:
                why = "; ".join(problems)
                report.problems.append(f"{name}: not ended on {other.name} {limit:g} s after the kill: {why}")
                return
            delay = terminal["_at"] - killed_at
            report.delays.append(delay)
            report.terminals[brief(terminal).partition(":")[2]] += 1
            error = terminal.get("error") or {}
            if (terminal["type"], error.get("type"), error.get("retryable")) != (
                "error",
                "replica_lost",
                True,
            ):
                problems.append(f"the terminal event is {terminal!r}, not a retryable replica_lost error")
            if delay > REPLICA_LOST_BOUND:
                problems.append(f"the terminal event came {delay:.2f} s after the kill")
            status, whole, ended = await _read_stream(client, url, limit=5.0)
            if status != 200 or not ended:
                problems.append(
                    f"the whole log answered {status}, {'ended' if ended else 'did not end in 5 s'}"
                )
            problems += [f"whole log: {p}" for p in log_problems(whole)]
            if problems:
                report.problems.append(f"{name}: {'; '.join(problems)}")
        except (httpx.HTTPError, TimeoutError) as exc:
            report.problems.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            if not arrived:
                gate.arrive()

    async def scenario() -> None:
        gate = _Gate(streams)
        killed: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        async with new_client() as client:
            tasks = [asyncio.create_task(one(client, i, gate, killed)) for i in range(streams)]
            try:
                async with asyncio.timeout(30.0):
                    await gate.open.wait()
                killed_at = time.monotonic()
                await asyncio.to_thread(runner.kill)
                killed.set_result(killed_at)
                async with asyncio.timeout(limit + 30.0):
                    await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    run_async(scenario)
    return report


# -- Redis goes away and comes back ----------------------------------------------------------


@dataclass
class RestartReport:
    how: str
    streams: int
    completed: int = 0  # the whole text, then done/stop
    typed: Counter[str] = field(default_factory=Counter)  # ended by a typed error event, by type
    cut: int = 0  # anything else: no terminal event, a gap or a duplicate in the ids
    outage: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # probe -> its answer while Redis was down
    recovery_s: dict[str, float | None] = field(default_factory=dict)  # replica -> Redis back to a new done
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        recovery = ", ".join(
            f"{k} {'never' if v is None else f'{v:.2f} s'}" for k, v in self.recovery_s.items()
        )
        return (
            f"Redis restarted ({self.how}) under {self.streams} streams: {self.completed} completed, "
            f"{sum(self.typed.values())} ended by a typed error {dict(self.typed)}, {self.cut} cut; "
            f"new streams after Redis came back: {recovery}"
        )


def restart_redis_mid_stream(
    upstream: ProfiledUpstream,
    redis: RedisServer,
    replicas: Sequence[Replica],
    *,
    how: str,
    streams: int = 50,
    down_for: float = 2.0,
) -> RestartReport:
    """Take ``redis`` down under ``streams`` live streams and bring it back empty ``down_for`` s later.

    ``how``: "shutdown" (SHUTDOWN NOSAVE) or "kill" (SIGKILL).  The streams (every other one resumable)
    are spread over ``replicas`` and read where they were started.  While Redis is down the API is
    probed (see :func:`_outage_problems`); once it is back, each replica is polled with new streams
    until one ends with ``done``.  Then: how every stream ended, and whether the replicas settle
    (healthy, nothing running, the active-streams gauge equal to /healthz's count).
    """
    report = RestartReport(how, streams)
    run = uuid.uuid4().hex[:8]
    results: list[tuple[str, list[Event], str]] = []  # prompt, events, how the response ended
    stream_ids: dict[int, str] = {}

    async def one(client: httpx.AsyncClient, i: int, gate: _Gate) -> None:
        replica = replicas[i % len(replicas)]
        prompt = f"steady:restart-{how}-{run}-{i}"
        body = {"prompt": prompt, "resumable": (i // len(replicas)) % 2 == 1}
        events: list[Event] = []
        ending = "ended"
        arrived = False
        try:
            async with asyncio.timeout(60.0):
                async with client.stream("POST", replica.url + "/api/stream", json=body) as response:
                    if response.status_code != 200:
                        ending = f"POST answered {response.status_code}"
                        return
                    stream_ids[i] = response.headers["x-stream-id"]
                    async for event in aiter_events(response):
                        events.append(event)
                        if not arrived and event.get("type") == "token" and int(event["_id"]) >= 4:
                            arrived = True  # mid-stream: three tokens in
                            gate.arrive()
        except (httpx.HTTPError, TimeoutError) as exc:
            ending = f"{type(exc).__name__}: {exc}"
        finally:
            results.append((prompt, events, ending))
            if not arrived:
                gate.arrive()

    async def probe_outage(client: httpx.AsyncClient) -> None:
        a, b = replicas[0], replicas[-1]
        running_on_a = next((sid for i, sid in stream_ids.items() if i % len(replicas) == 0), "str_none")
        unknown = "str_" + uuid.uuid4().hex
        quick = {"prompt": f"quick:{run}"}
        probes = {
            f"POST /api/stream ({a.name})": ("POST", a.url + "/api/stream", quick),
            f"POST /api/stream ({b.name})": ("POST", b.url + "/api/stream", quick),
            "GET /api/stream/<unknown>": ("GET", f"{a.url}/api/stream/{unknown}", None),
            f"GET /api/stream/<running on {a.name}> ({b.name})": (
                "GET",
                f"{b.url}/api/stream/{running_on_a}",
                None,
            ),
            "DELETE /api/stream/<unknown>": ("DELETE", f"{b.url}/api/stream/{unknown}", None),
            f"GET /healthz ({a.name})": ("GET", a.url + "/healthz", None),
            f"GET /healthz ({b.name})": ("GET", b.url + "/healthz", None),
        }
        answers = await asyncio.gather(*(_probe(client, *probe) for probe in probes.values()))
        for name, answer in zip(probes, answers):
            report.outage[name] = answer
            wrong = _outage_problems(name, answer)
            if wrong:
                report.problems.append(f"while Redis was down, {name}: {'; '.join(wrong)}")

    async def scenario() -> None:
        gate = _Gate(streams)
        async with new_client() as client:
            tasks = [asyncio.create_task(one(client, i, gate)) for i in range(streams)]
            try:
                async with asyncio.timeout(30.0):
                    await gate.open.wait()
                await asyncio.to_thread(redis.stop, how)
                stopped_at = time.monotonic()
                await probe_outage(client)
                # The outage itself: Redis stays down this long, however long the probes took.
                await asyncio.sleep(max(0.0, stopped_at + down_for - time.monotonic()))
                await asyncio.to_thread(redis.start)
                back_at = time.monotonic()
                recovered = await asyncio.gather(
                    *(_first_new_stream(client, r, back_at, run) for r in replicas)
                )
                for replica, seconds in zip(replicas, recovered):
                    report.recovery_s[replica.name] = seconds
                    if seconds is None or seconds > RECOVERY_BOUND:
                        late = "never (10 s)" if seconds is None else f"{seconds:.2f} s"
                        report.problems.append(
                            f"{replica.name}: a new stream ended with done {late} after Redis came back"
                        )
                async with asyncio.timeout(60.0):
                    await asyncio.gather(*tasks)
                unsettled = await _settle(replicas)
                if unsettled:
                    report.problems.append(f"the replicas did not settle within 10 s: {unsettled}")
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    try:
        run_async(scenario)
    finally:
        if not redis.running:
            redis.start()
    for prompt, events, ending in results:
        problems = log_problems(events)
        terminal = terminal_of(events)
        if not problems and terminal is not None:
            error = terminal.get("error") or {}
            if terminal["type"] == "done" and terminal.get("finish_reason") == "stop":
                if text_of(events) == expected_text(prompt):
                    report.completed += 1
                    continue
                problems.append(
                    f"done/stop after {len(text_of(events))} of {len(expected_text(prompt))} characters"
                )
            elif isinstance(error.get("type"), str) and isinstance(error.get("retryable"), bool):
                report.typed[error["type"]] += 1
                continue
            else:
                problems.append(f"ends with {terminal!r}")
        report.cut += 1
        report.problems.append(f"{prompt}: {'; '.join(problems)} (response: {ending})")
    return report


async def _probe(client: httpx.AsyncClient, method: str, url: str, body: Any) -> dict[str, Any]:
    started = time.monotonic()
    answer: dict[str, Any] = {}
    try:
        async with asyncio.timeout(5.0):
            async with client.stream(method, url, json=body) as response:
                answer["status"] = response.status_code
                answer["retry_after"] = response.headers.get("retry-after")
                if response.headers.get("content-type", "").startswith("application/json"):
                    answer["json"] = json.loads(await response.aread())
                # anything else (a stream) is left unread: leaving the block closes it
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:
        answer["exception"] = f"{type(exc).__name__}: {exc}"
    answer["s"] = time.monotonic() - started
    return answer


def _outage_problems(name: str, answer: dict[str, Any]) -> list[str]:
    """While the store is down: /api/stream… answer 503 store_unavailable with Retry-After, /healthz 503
    with a status other than "ok"; all at once (OUTAGE_ANSWER_BOUND)."""
    if "exception" in answer:
        return [f"no answer in {answer['s']:.2f} s ({answer['exception']})"]
    problems = []
    if answer["s"] > OUTAGE_ANSWER_BOUND:
        problems.append(f"answered after {answer['s']:.2f} s")
    body = answer.get("json")
    if answer["status"] != 503:
        problems.append(f"answered {answer['status']}, not 503")
    if "/healthz" in name:
        if not isinstance(body, dict) or body.get("status") in (None, "ok"):
            problems.append(f"healthz says {body!r}")
        return problems
    error = body.get("error") if isinstance(body, dict) else None
    if not (
        isinstance(error, dict)
        and error.get("type") == "store_unavailable"
        and isinstance(error.get("message"), str)
    ):
        problems.append(f"body {body!r} is not a store_unavailable error")
    if not answer.get("retry_after"):
        problems.append("no Retry-After")
    return problems


async def _first_new_stream(
    client: httpx.AsyncClient, replica: Replica, since: float, run: str
) -> float | None:
    """Seconds from ``since`` until a new stream on ``replica`` ended with done, trying every 50 ms."""
    attempt = 0
    while time.monotonic() - since < 10.0:
        attempt += 1
        body = {"prompt": f"quick:recover-{run}-{replica.name}-{attempt}"}
        try:
            async with asyncio.timeout(2.0):
                async with client.stream("POST", replica.url + "/api/stream", json=body) as response:
                    if response.status_code == 200:
                        terminal = terminal_of([event async for event in aiter_events(response)])
                        if terminal is not None and terminal["type"] == "done":
                            return time.monotonic() - since
        except (httpx.HTTPError, TimeoutError, ValueError):
            pass
        await asyncio.sleep(0.05)
    return None


async def _settle(replicas: Sequence[Replica], timeout: float = 10.0) -> str:
    """What is not settled yet, after ``timeout``; "" as soon as every replica is healthy, runs nothing,
    and its active-streams gauge agrees with /healthz."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2.0) as client:
        while True:
            states = []
            for replica in replicas:
                try:
                    health = await client.get(replica.url + "/healthz")
                    body = health.json()
                    gauge = _gauge(
                        (await client.get(replica.url + "/metrics")).text, "tokenwire_active_streams"
                    )
                    states.append(
                        (
                            replica.name,
                            health.status_code,
                            body.get("status"),
                            body.get("active_streams"),
                            gauge,
                        )
                    )
                except (httpx.HTTPError, ValueError) as exc:
                    states.append((replica.name, type(exc).__name__, None, None, None))
            if all(
                code == 200 and status == "ok" and active == 0 == gauge
                for _, code, status, active, gauge in states
            ):
                return ""
            if time.monotonic() >= deadline:
                return "; ".join(
                    f"{name}: /healthz {code} status={status} active_streams={active}, "
                    f"tokenwire_active_streams={gauge}"
                    for name, code, status, active, gauge in states
                )
            await asyncio.sleep(0.05)


def _gauge(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None
