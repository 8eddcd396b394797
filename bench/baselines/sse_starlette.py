"""Baseline (b): sse-starlette's ``EventSourceResponse`` over an httpx upstream stream.

The generator yields one dict per token and sse-starlette encodes and sends it (its own
disconnect watcher and 15 s pings included), as its README shows.  The httpx client has no
connection cap, for the reason given in ``tutorial.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from pydantic import BaseModel
from sse_starlette.sse import EventSourceResponse

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000/v1")

client = httpx.AsyncClient(base_url=UPSTREAM, timeout=None, limits=httpx.Limits(max_connections=None))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    await client.aclose()


app = FastAPI(lifespan=lifespan)


class StreamRequest(BaseModel):
    prompt: str
    model: str = "fake"


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/api/stream")
async def stream(request: StreamRequest) -> EventSourceResponse:
    async def events() -> AsyncIterator[dict[str, str]]:
        body = {"model": request.model, "messages": [{"role": "user", "content": request.prompt}], "stream": True}
        async with client.stream("POST", "/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    yield {"data": json.dumps({"type": "token", "text": chunk["choices"][0]["delta"]["content"]})}
        yield {"data": json.dumps({"type": "done"})}

    return EventSourceResponse(events())
