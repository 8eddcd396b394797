"""Tokens per second: LocalProvider vs calling llama-cpp-python directly.

Method: two ``Llama`` instances of the same GGUF file with the same settings
(n_ctx, threads): one called directly (``create_chat_completion(stream=True)``
in a loop, counting chunks with content), one owned by a started
``LocalProvider`` (iterating ``stream()`` on an event loop, counting ``Token``
events).  Same prompt, ``max_tokens``, temperature 0 and seed; one warm-up run
each, then ``--runs`` runs each, interleaved so that machine noise hits both
alike.  Time is wall clock from the request to the last event; both reuse the
prompt's KV cache after the first run, so this measures token generation.
Both sides must produce the same text (checked), or the comparison is void.

What the provider adds per token: the abort callback polled by ggml, the
sampling counter, a ``call_soon_threadsafe`` hop to the loop, an async
generator step.

    .venv/bin/python bench/local_model.py [--runs 3] [--max-tokens 128] [--model-path PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from llama_cpp import Llama

from tokenwire import Finish, GenerationRequest, Token
from tokenwire.providers.local import LocalProvider

PROMPT = "Write a long story about a dragon who learns to cook."


def run_direct(llm: Llama, max_tokens: int) -> tuple[float, int, str]:
    messages = [{"role": "user", "content": PROMPT}]
    started = time.perf_counter()
    pieces = []
    for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens, temperature=0.0, seed=1):  # type: ignore[arg-type, union-attr]
        text = chunk["choices"][0]["delta"].get("content")  # type: ignore[index]
        if text:
            pieces.append(text)
    return time.perf_counter() - started, len(pieces), "".join(pieces)


async def run_provider(provider: LocalProvider, max_tokens: int) -> tuple[float, int, str]:
    request = GenerationRequest.from_prompt(PROMPT, max_tokens=max_tokens, temperature=0.0, seed=1)
    started = time.perf_counter()
    pieces = []
    async for event in provider.stream(request):
        if isinstance(event, Token):
            pieces.append(event.text)
        elif isinstance(event, Finish):
            assert event.usage is not None and event.usage.completion_tokens == max_tokens, event
    return time.perf_counter() - started, len(pieces), "".join(pieces)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model-path")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()

    provider = LocalProvider(args.model_path, n_threads=args.threads)
    await provider.startup()
    llm = Llama(
        model_path=provider.model_path,
        n_ctx=provider.n_ctx,
        n_threads=provider.n_threads,
        n_threads_batch=provider.n_threads,
        verbose=False,
    )
    print(f"model {provider.default_model}, {provider.n_threads} threads, max_tokens {args.max_tokens}")
    try:
        # Warm-up, and the correctness check: both sides generate the same text.
        _, _, direct_text = run_direct(llm, args.max_tokens)
        _, _, provider_text = await run_provider(provider, args.max_tokens)
        assert direct_text == provider_text, "the provider and llama-cpp-python disagree"

        rates: dict[str, list[float]] = {"direct": [], "provider": []}
        for _ in range(args.runs):
            for name in rates:
                if name == "direct":
                    elapsed, n, _ = run_direct(llm, args.max_tokens)
                else:
                    elapsed, n, _ = await run_provider(provider, args.max_tokens)
                rates[name].append(args.max_tokens / elapsed)
                assert n > 0
        for name, values in rates.items():
            runs = ", ".join(f"{v:.1f}" for v in values)
            print(f"{name:>8}: median {statistics.median(values):6.1f} tokens/s  (runs: {runs})")
        ratio = statistics.median(rates["provider"]) / statistics.median(rates["direct"])
        print(f"   ratio: provider / direct = {ratio:.3f}")
    finally:
        llm.close()
        await provider.aclose()


if __name__ == "__main__":
    asyncio.run(main())
