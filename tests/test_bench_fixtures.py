"""The benchmarks' inputs are right: every parser pair agrees on the fixtures, the fake upstream speaks
OpenAI's stream format, and the load generator counts every token it is sent.

A parser benchmark means nothing if the two parsers do not yield the same events from the same
bytes (bench/fixtures.py); a latency benchmark means nothing if tokens get lost or misread.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import json
import shutil
from array import array
from pathlib import Path

import pytest

# httpx-sse (the `test` extra) and bench/node_modules (`make test` runs `npm ci --prefix bench`)
# are installed by the project's own files.
from bench import fixtures, parsers
from bench.loadgen import Target, run_streams
from bench.relay import latency_ms
from bench.report import _long_windows
from bench.upstream import FakeUpstream

from tokenwire import GenerationRequest
from tokenwire._events import Finish, Token
from tokenwire.providers.openai import OpenAIProvider  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "bench"
DATA = fixtures.build()


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sse-fixtures")
    fixtures.write(directory)
    return directory


@pytest.mark.parametrize("name", sorted(DATA))
def test_python_parsers_agree(name: str) -> None:
    reads = fixtures.reads(DATA[name])
    ours = parsers.parse_tokenwire(reads)
    peer = parsers.parse_httpx_sse(reads)
    assert len(ours) == len(peer)
    assert ours == peer
    assert len(ours) > 50


def test_fixtures_are_what_they_say() -> None:
    tokens = parsers.parse_tokenwire(fixtures.reads(DATA["tokens"]))
    assert len(tokens) == 50_002  # start, 50,000 tokens, done
    assert [json.loads(e[1])["type"] for e in (tokens[0], tokens[1], tokens[-1])] == ["start", "token", "done"]
    # Every event has its own id, so that "last event id" and "this event's id" parsers agree.
    assert all(e[2] for e in tokens)
    assert parsers.parse_tokenwire(fixtures.reads(DATA["tokens-crlf"])) == tokens
    assert b"\r\n" in DATA["tokens-crlf"] and b"\r\n" not in DATA["tokens"]
    large = parsers.parse_tokenwire(fixtures.reads(DATA["large"]))
    assert len(large) == 64 and min(len(e[1]) for e in large) > 30_000
    assert {e[0] for e in large} == {"document", "message"}
    # The reads split multibyte characters: the decoders' incremental UTF-8 is exercised.
    assert any(not _is_utf8(chunk) for chunk in fixtures.reads(DATA["tokens"]))


def _is_utf8(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _node_modules() -> None:
    assert (BENCH / "node_modules" / "eventsource-parser").exists(), "run `npm ci --prefix bench` (make test does)"


def test_javascript_parsers_agree_with_each_other_and_with_python(fixture_dir: Path) -> None:
    assert shutil.which("node"), "node is needed for the JavaScript parser check"
    _node_modules()
    js = parsers.run_node(fixture_dir, 1, check_only=True)
    assert sorted(js) == sorted(DATA)
    for name, row in js.items():
        python_digest = parsers.digest(parsers.parse_tokenwire(fixtures.reads(DATA[name])))
        for parser_name, result in row.items():
            assert result["digest"] == python_digest, f"{parser_name} on {name}"


def test_fake_upstream_speaks_openai_and_the_load_generator_counts_every_token() -> None:
    async def scenario() -> None:
        upstream = FakeUpstream()
        await upstream.start()
        try:
            # tokenwire's own provider reads the fake upstream's stream as a real one.
            provider = OpenAIProvider(upstream.base_url, model="fake")
            await provider.startup()
            events = [e async for e in provider.stream(GenerationRequest.from_prompt("bench id=t1 n=5 rate=500"))]
            await provider.aclose()
            texts = [e.text for e in events if isinstance(e, Token)]
            assert len(texts) == 5 and all(t.startswith("@") and t[1:].isdigit() and len(t) == 21 for t in texts)
            assert isinstance(events[-1], Finish) and events[-1].usage is not None
            assert events[-1].usage.completion_tokens == 5
            assert upstream.records["t1"].finished_ns and not upstream.records["t1"].closed_ns

            # The load generator straight against the upstream: every token counted, none lost.
            target = Target("loopback", upstream.port, "/v1/chat/completions", openai=True)
            result = await run_streams(target, 10, 100, ramp_s=0.1, measure_s=0.3)
            assert result.failed == 0, result.errors
            # 10 streams x 100 tokens/s x 0.3 s in the window, give or take one token per stream.
            assert result.expected_tokens == 300
            assert abs(len(result.latencies_ns) - 300) <= 10
            assert result.tokens > len(result.latencies_ns)  # tokens before the window were read too
            assert all(0 < ns < 1e9 for ns in result.latencies_ns)
        finally:
            await upstream.aclose()

    asyncio.run(scenario())


def test_latency_percentiles_are_over_every_token_of_every_run() -> None:
    """A 1-stream run holds few tokens: its nearest-rank p99 is its maximum, and a median of such
    maxima is no p99.  The table's percentiles pool the runs (and report.py says so)."""
    runs = [array("q", [i * 1_000_000 for i in range(start, 201, 2)]) for start in (1, 2)]  # 1..200 ms
    pooled = array("q")
    for run in runs:
        pooled.extend(run)
    got = latency_ms(pooled)
    assert (got["p50_ms"], got["p90_ms"], got["p99_ms"], got["p999_ms"], got["max_ms"]) == (100.0, 180.0, 198.0, 200.0, 200.0)

    r = {"plan": {"measure_s": 4.0, "min_samples": 200}, "latency": {"measure_s": {"1": 10.0, "100": 4.0}}}
    assert "10 s at 1 stream:" in _long_windows(r) and "100" not in _long_windows(r)
    assert _long_windows({"plan": {"measure_s": 4.0}, "latency": {"measure_s": {"100": 4.0}}}) == ""


def test_every_name_the_bench_imports_from_tokenwire_exists() -> None:
    # Sections import tokenwire's internals inside functions, which only a whole `make bench` runs:
    # a rename in src/ (once `_available_cpus`) otherwise breaks the bench an hour into its run.
    missing = []
    for path in sorted(BENCH.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tokenwire"):
                module = importlib.import_module(node.module)
                missing += [
                    f"{path.relative_to(BENCH.parent)}:{node.lineno}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name) and not _submodule(module, alias.name)
                ]
    assert missing == []


def _submodule(module: object, name: str) -> bool:
    """``from package import module``: ``name`` is a module of ``module``, a package."""
    return hasattr(module, "__path__") and importlib.util.find_spec(f"{module.__name__}.{name}") is not None
