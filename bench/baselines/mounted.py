"""tokenwire mounted in a user's own FastAPI app, as README.md's "FastAPI" example writes it.

Not a baseline to beat: the ``paths`` section measures what a token costs through tokenwire's relay
when a user serves it from their own app (their own uvicorn, their own route returning an
``EventStreamResponse``) rather than from ``create_app``.  The body is ``{"prompt": ...}``, as the
load generator sends it to ``/api/stream``.
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from tokenwire import EventStreamResponse, GenerationRequest, Relay
from tokenwire.providers.openai import OpenAIProvider

relay = Relay(OpenAIProvider(os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:9000/v1"), model="fake"))
app = FastAPI(lifespan=relay.lifespan)


class Chat(BaseModel):
    prompt: str


@app.post("/chat")
async def chat(body: Chat) -> EventStreamResponse:
    meta, _ = await relay.start(GenerationRequest.from_prompt(body.prompt))
    return EventStreamResponse(relay, meta)


@app.get("/healthz")
async def healthz() -> PlainTextResponse:
    return PlainTextResponse("ok")  # what bench/servers.py waits for
