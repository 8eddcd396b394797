"""Local model: tokens/s and time to first token through tokenwire vs llama-cpp-python directly.

"Direct" is ``Llama.create_chat_completion(stream=True)`` in a worker process of its own
(``python -m bench.local --worker``), as ``bench/local_model.py`` calls it (same prompt).  "Through tokenwire" is a real
``tokenwire serve --provider local`` process and an HTTP client on ``POST /api/stream``: everything a
user pays for.  The client (httptools, on the same 2 cores) stamps each read and counts its token
events; it decodes the events after the run, so that its own CPU does not slow the model.  Both load the same bundled GGUF with the same settings
(n_ctx 2048, all cores for threads), both processes run on all cores (the only benchmark that does),
one at a time, interleaved: warm-up each, then ``runs`` rounds.  Temperature 0 and seed 1 on both: the texts
must be equal, or the comparison is void.

TTFT: from the call (direct) or from sending the POST (tokenwire) to the first token.  llama.cpp's
threads wait for each other at every step, so any other process on the machine slows a run a lot:
the report gives every run and the best besides the median.
Decode rate: (tokens - 1) / (last token - first token).  End to end: tokens / (last token - call).

Cancellation through the local provider (``cancel_probes``), measured at the clients only, on one
clock: three streams A (generating), B (queued, 1st) and C (queued, 2nd).  Aborting B (*queued*),
or A after its 3rd token (*mid-stream*), or A while it still evaluates a long prompt (*before first
token*) moves C up to 1st; the latency is from the abort to C parsing its ``queued`` event with
position 1.  That covers the relay noticing the disconnect, the job leaving the queue or llama.cpp
stopping mid-step (its abort callback), and the next job being started and the rest told so.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httptools
import httpx

from tokenwire._sse import SSEDecoder

from . import local_abort, servers

try:  # the prompt bench/local_model.py uses, when that module is there
    from .local_model import PROMPT
except Exception:  # noqa: BLE001 - any import problem: use our own
    PROMPT = "Write a long story about a dragon who learns to cook."


def _result(started: float, stamps: list[float], pieces: list[str]) -> dict[str, Any]:
    n = len(stamps)
    return {
        "tokens": n,
        "ttft_ms": (stamps[0] - started) * 1000 if n else float("nan"),
        "decode_tokens_per_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else float("nan"),
        "e2e_tokens_per_s": n / (stamps[-1] - started) if n else float("nan"),
        "text": "".join(pieces),
    }


def run_direct(llm: Any, max_tokens: int) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    pieces: list[str] = []
    stamps: list[float] = []
    started = time.perf_counter()
    for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens, temperature=0.0, seed=1):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            stamps.append(time.perf_counter())
            pieces.append(text)
    return _result(started, stamps, pieces)


_TOKEN_MARK = b'"type":"token"'


class _TimedResponse(asyncio.Protocol):
    """One HTTP response, read with httptools: each body piece with the time it arrived, nothing parsed.

    The client shares the 2 cores with llama.cpp's threads, which wait for each other at every
    step: whatever CPU the client spends per token slows the model it measures.  So it only
    stamps each read and counts the token events in it; the text is decoded after the run.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.stamps: list[float] = []
        self.body: list[bytes] = []
        self.status = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tail = b""  # the end of the last piece, in case a token mark is split between two
        self._pending = 0

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self._pending = 0  # token events completed by this read, counted by on_body
        self.parser.feed_data(data)
        self.stamps.extend([now] * self._pending)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        joined = self._tail + body
        self._pending += joined.count(_TOKEN_MARK) - self._tail.count(_TOKEN_MARK)
        self._tail = joined[-(len(_TOKEN_MARK) - 1) :]

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"tokenwire closed the connection ({exc})"))


async def run_tokenwire(port: int, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "seed": 1}).encode()
    request = (
        b"POST /api/stream HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    transport, response = await loop.create_connection(_TimedResponse, "127.0.0.1", port)
    try:
        transport.write(request)
        await response.done
    finally:
        transport.close()
    if response.status != 200:
        raise RuntimeError(f"tokenwire answered HTTP {response.status}: {b''.join(response.body)[:300]!r}")
    pieces = []
    decoder = SSEDecoder()
    for sse in decoder.decode(b"".join(response.body)):
        event = json.loads(sse.data)
        if event["type"] == "token":
            pieces.append(event["text"])
        elif event["type"] == "error":
            raise RuntimeError(f"tokenwire answered an error event: {event}")
    if len(pieces) != len(response.stamps):
        raise RuntimeError(f"counted {len(response.stamps)} token events while reading, {len(pieces)} after")
    return _result(started, response.stamps, pieces)


class _Probe:
    """One POSTed stream read in a task of its own: its events, each with the time it was parsed."""

    def __init__(self, client: httpx.AsyncClient, port: int, body: dict[str, Any]) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, port, body))

    async def _read(self, client: httpx.AsyncClient, port: int, body: dict[str, Any]) -> None:
        decoder = SSEDecoder()
        async with client.stream("POST", f"http://127.0.0.1:{port}/api/stream", json=body) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw():
                now = time.perf_counter()
                for sse in decoder.decode(chunk):
                    self.events.append((now, json.loads(sse.data)))
                self._changed.set()

    async def wait_for(self, match: Any, timeout: float = 30.0) -> float:
        """The parse time of the first event ``match(event)`` accepts, waiting for it if need be."""
        async with asyncio.timeout(timeout):
            while True:
                for at, event in self.events:
                    if match(event):
                        return at
                if self.task.done():
                    raise RuntimeError(f"the stream ended without the event awaited: {self.events[-3:]}")
                self._changed.clear()
                await self._changed.wait()

    def tokens(self) -> int:
        return sum(e["type"] == "token" for _, e in self.events)

    async def abort(self) -> float:
        at = time.perf_counter()
        self.task.cancel()  # closes the connection: httpx never reuses a half-read response's socket
        await asyncio.gather(self.task, return_exceptions=True)
        return at


def _queued_at(position: int) -> Any:
    return lambda e: e["type"] == "queued" and e.get("position") == position


async def cancel_probe(client: httpx.AsyncClient, port: int, phase: str) -> float | None:
    """One probe (see the module docstring): ms from the abort to C hearing it moved up; None if void."""
    long_prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)  # ~1,500 tokens to evaluate
    a_body = {"prompt": long_prompt if phase == "before first token" else PROMPT, "max_tokens": 400}
    a = _Probe(client, port, a_body)
    b = c = None
    try:
        await a.wait_for(lambda e: e["type"] == ("start" if phase == "before first token" else "token"))
        b = _Probe(client, port, {"prompt": "hi", "max_tokens": 4})
        await b.wait_for(_queued_at(1))
        c = _Probe(client, port, {"prompt": "hi", "max_tokens": 4})
        await c.wait_for(_queued_at(2))
        if phase == "mid-stream":
            await a.wait_for(lambda e: e["type"] == "token" and a.tokens() >= 3)
        victim = b if phase == "queued" else a
        if phase == "before first token" and a.tokens():
            return None  # the prompt was evaluated already: not this phase
        aborted = await victim.abort()
        moved = await c.wait_for(_queued_at(1), timeout=10)
        if phase == "before first token" and a.tokens():
            return None
        return (moved - aborted) * 1000
    finally:
        for probe in (a, b, c):
            if probe is not None:
                await probe.abort()


async def cancel_probes(client: httpx.AsyncClient, port: int, probes: int, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for phase in ("queued", "before first token", "mid-stream"):
        samples = [ms for ms in [await cancel_probe(client, port, phase) for _ in range(probes)] if ms is not None]
        samples.sort()
        row: dict[str, Any] = {"n": len(samples), "void": probes - len(samples)}
        if samples:
            row |= {
                "p50_ms": statistics.median(samples),
                "p99_ms": samples[min(len(samples) - 1, max(0, math.ceil(0.99 * len(samples)) - 1))],
                "max_ms": samples[-1],
            }
            log(f"local   cancel {phase:<18}: p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  n {row['n']}")
        out[phase] = row
    return out


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


class DirectWorker:
    """llama-cpp-python in a process of its own, started on every core: one JSON line per run."""

    def __init__(self, max_tokens: int, cpus: set[int]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.local", "--worker", "--max-tokens", str(max_tokens)],
            cwd=servers.ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        )  # fmt: skip

    def _call(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the llama-cpp-python worker died")
        return json.loads(line)

    def ready(self) -> dict[str, Any]:
        return self._call("ready")

    def run(self) -> dict[str, Any]:
        return self._call("run")

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def worker(max_tokens: int) -> None:
    from llama_cpp import Llama

    from tokenwire.providers.local import bundled_model_path

    n = len(os.sched_getaffinity(0))
    model_path = bundled_model_path()
    llm = Llama(model_path=model_path, n_ctx=2048, n_threads=n, n_threads_batch=n, verbose=False)
    for line in sys.stdin:
        if line.strip() == "ready":
            reply: dict[str, Any] = {"model": Path(model_path).name, "threads": n}
        else:
            reply = run_direct(llm, max_tokens)
        print(json.dumps(reply), flush=True)
    llm.close()


async def bench(runs: int, max_tokens: int, log_dir: Path, log: Any, cancel_runs: int = 10) -> dict[str, Any]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return {"error": f"llama-cpp-python is not installed ({exc})"}
    all_cpus = set(range(os.cpu_count() or 1))
    server = servers.local_tokenwire()
    direct = DirectWorker(max_tokens, all_cpus)
    try:
        await asyncio.to_thread(server.start, cpus=all_cpus, log_dir=log_dir, timeout=120)
        info = await asyncio.to_thread(direct.ready)
        rows: dict[str, list[dict[str, Any]]] = {"direct": [], "tokenwire": []}
        warm_direct = await asyncio.to_thread(direct.run)
        warm_tokenwire = await run_tokenwire(server.port, max_tokens)
        same_text = warm_direct["text"] == warm_tokenwire["text"]
        for _ in range(runs):
            rows["direct"].append(await asyncio.to_thread(direct.run))
            rows["tokenwire"].append(await run_tokenwire(server.port, max_tokens))
        out: dict[str, Any] = {
            "model": info["model"], "threads": info["threads"], "max_tokens": max_tokens, "runs": runs,
            "same_text": same_text,
        }  # fmt: skip
        for name, r in rows.items():
            out[name] = {
                "ttft_ms": _median(r, "ttft_ms"),
                "decode_tokens_per_s": _median(r, "decode_tokens_per_s"),
                "e2e_tokens_per_s": _median(r, "e2e_tokens_per_s"),
                "best_decode_tokens_per_s": max(x["decode_tokens_per_s"] for x in r),
                "tokens": _median(r, "tokens"),
                "runs": [{k: v for k, v in x.items() if k != "text"} for x in r],
            }
            log(
                f"local   {name:<10} TTFT {out[name]['ttft_ms']:.0f} ms  decode {out[name]['decode_tokens_per_s']:.1f} "
                f"tok/s (best {out[name]['best_decode_tokens_per_s']:.1f})  end-to-end {out[name]['e2e_tokens_per_s']:.1f} "
                f"tok/s  runs: {', '.join(f'{x:.0f}' for x in (y['decode_tokens_per_s'] for y in r))}"
            )
        out["decode_ratio"] = out["tokenwire"]["decode_tokens_per_s"] / out["direct"]["decode_tokens_per_s"]
        out["best_decode_ratio"] = (
            out["tokenwire"]["best_decode_tokens_per_s"] / out["direct"]["best_decode_tokens_per_s"]
        )
        out["e2e_ratio"] = out["tokenwire"]["e2e_tokens_per_s"] / out["direct"]["e2e_tokens_per_s"]
        if not same_text:
            log("local   WARNING: tokenwire and llama-cpp-python generated different texts")
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
            out["cancel"] = await cancel_probes(client, server.port, cancel_runs, log)
        server.stop()  # one model at a time from here
        out["abort_by_ubatch"] = await asyncio.to_thread(
            local_abort.run, log, prompt_runs=2 if cancel_runs >= 10 else 1, aborts=min(cancel_runs, 20)
        )
        return out
    finally:
        direct.close()
        server.stop()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--max-tokens", type=int, default=128)
    worker(parser.parse_args().max_tokens)
