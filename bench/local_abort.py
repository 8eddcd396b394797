"""How long llama.cpp takes to stop a prompt evaluation, by ``n_ubatch``: why LocalProvider uses 64.

llama.cpp polls its abort callback between the nodes of a compute graph, and a graph covers
``n_ubatch`` prompt tokens: the bigger the graph, the longer its biggest node (a matrix product
over every token of the graph) and the longer a cancel waits.  For each ``n_ubatch``, in a
process of its own (``python -m bench.local_abort``), with llama-cpp-python called directly and
the provider's C abort switch:

* prompt speed: a ~1,500-token prompt evaluated whole, ``PROMPT_RUNS`` times after a warm-up (median);
* abort latency: the same evaluation aborted after a random 50-1000 ms, ``ABORTS`` times; the
  time from setting the switch to ``eval()`` raising, on one thread's clock.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

UBATCHES = (512, 64)
PROMPT_RUNS = 2
ABORTS = 20
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)


def measure(n_ubatch: int, prompt_runs: int, aborts: int) -> dict[str, Any]:
    import llama_cpp

    from tokenwire.providers.base import available_cpus
    from tokenwire.providers.local import _AbortSwitch, bundled_model_path

    threads = available_cpus()
    llm = llama_cpp.Llama(
        model_path=bundled_model_path(), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
        n_ubatch=n_ubatch, verbose=False,
    )  # fmt: skip
    switch = _AbortSwitch(llama_cpp)
    llama_cpp.llama_set_abort_callback(llm.ctx, switch.callback, switch.data)
    tokens = llm.tokenize(LONG_PROMPT.encode())
    llm.eval(tokens[:256])  # warm-up: first touches of the weights and buffers
    speeds = []
    for _ in range(prompt_runs):
        llm.reset()
        started = time.perf_counter()
        llm.eval(tokens)
        speeds.append(len(tokens) / (time.perf_counter() - started))
    rng = random.Random(n_ubatch)
    latencies = []
    for _ in range(aborts):
        llm.reset()
        switch.clear()
        ended: dict[str, Any] = {}

        def evaluate() -> None:
            try:
                llm.eval(tokens)
            except RuntimeError:  # "llama_decode returned 2": aborted
                ended["at"] = time.perf_counter()

        worker = threading.Thread(target=evaluate)
        worker.start()
        time.sleep(rng.uniform(0.05, 1.0))  # the scenario: abort somewhere inside the evaluation
        aborted_at = time.perf_counter()
        switch.set()
        worker.join()
        if "at" in ended:
            latencies.append((ended["at"] - aborted_at) * 1000)
    latencies.sort()
    llm.close()
    return {
        "n_ubatch": n_ubatch,
        "prompt_tokens": len(tokens),
        "prompt_tokens_per_s": statistics.median(speeds),
        "aborts": len(latencies),
        "abort_p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "abort_max_ms": latencies[-1] if latencies else float("nan"),
    }


def run(
    log: Any, ubatches: tuple[int, ...] = UBATCHES, prompt_runs: int = PROMPT_RUNS, aborts: int = ABORTS
) -> list[dict[str, Any]]:
    """Each ``n_ubatch`` in a fresh process (one model at a time)."""
    rows = []
    for n_ubatch in ubatches:
        out = subprocess.run(
            [sys.executable, "-m", "bench.local_abort", str(n_ubatch), str(prompt_runs), str(aborts)],
            capture_output=True, text=True, check=True, timeout=600,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        log(
            f"local   n_ubatch {n_ubatch:>4}: prompt {row['prompt_tokens_per_s']:.0f} tok/s  abort p50 "
            f"{row['abort_p50_ms']:.2f} ms  max {row['abort_max_ms']:.2f} ms  (n {row['aborts']})"
        )
        rows.append(row)
    return rows


if __name__ == "__main__":
    n_ubatch, prompt_runs, aborts = (int(x) for x in sys.argv[1:4])
    print(json.dumps(measure(n_ubatch, prompt_runs, aborts)))
