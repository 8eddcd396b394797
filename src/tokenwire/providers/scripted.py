"""A deterministic fake model for tests, demos without a model, and benchmarks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from .._events import Finish, ProviderEvent, Token, Usage
from .base import GenerationRequest, Provider

DEFAULT_SCRIPT = (
    "Tokens travel from the model to your browser one by one, as Server-Sent Events over fetch. "
    "Press Stop and the generation ends at once, upstream included."
)


def split_tokens(text: str) -> list[str]:
    """Word-ish tokens that keep their leading space, like a BPE tokenizer would."""
    tokens: list[str] = []
    for i, word in enumerate(text.split(" ")):
        tokens.append(word if i == 0 else " " + word)
    return [t for t in tokens if t]


class ScriptedProvider(Provider):
    """Yields ``tokens`` (or the words of ``text``), one every ``interval`` seconds.

    ``first_token_delay`` simulates prompt processing.  ``max_tokens`` is honoured
    (``finish_reason: "length"``).  With ``echo=True`` the last user message is the
    script, which makes demos and tests easy to read.
    """

    name = "scripted"
    default_model = "scripted"

    def __init__(
        self,
        text: str = DEFAULT_SCRIPT,
        *,
        tokens: list[str] | None = None,
        interval: float = 0.02,
        first_token_delay: float = 0.0,
        echo: bool = False,
    ) -> None:
        self.tokens = tokens if tokens is not None else split_tokens(text)
        self.interval = interval
        self.first_token_delay = first_token_delay
        self.echo = echo

    def _script(self, request: GenerationRequest) -> list[str]:
        if self.echo:
            for message in reversed(request.messages):
                if message.get("role") == "user":
                    return split_tokens(message.get("content", ""))
        return self.tokens

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        tokens = self._script(request)
        limit = request.max_tokens if request.max_tokens is not None else len(tokens)
        prompt_tokens = sum(len(split_tokens(m.get("content", ""))) for m in request.messages)
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        sent = 0
        for token in itertools.islice(tokens, limit):
            if sent and self.interval:
                await asyncio.sleep(self.interval)
            yield Token(token)
            sent += 1
        reason = "length" if limit < len(tokens) else "stop"
        yield Finish(reason, Usage(completion_tokens=sent, prompt_tokens=prompt_tokens))
