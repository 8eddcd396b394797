"""Baseline (a): FastAPI ``StreamingResponse`` over an httpx upstream stream, the tutorial way.

An async generator reads the upstream's lines, parses each ``chat.completion.chunk`` and yields
``data: {...}\\n\\n`` per token; Starlette sends each yield as one write.  One deliberate departure
from most tutorials: the shared ``httpx.AsyncClient`` has no connection cap.  With httpx's default
(100 connections, 5 s pool timeout) this relay fails outright above 100 concurrent streams, which
would measure the pool, not the streaming.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

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
async def stream(request: StreamRequest) -> StreamingResponse:
    async def generate() -> AsyncIterator[str]:
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
                    yield f"data: {json.dumps({'type': 'token', 'text': chunk['choices'][0]['delta']['content']})}\n\n"
        yield f"data: {json.dumps({'type': 'done'})}\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream")
