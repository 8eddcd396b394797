"""The usual ways to relay tokens, written as their documentation and tutorials write them.

Each is an ASGI app with ``POST /api/stream`` (``{"prompt": "..."}``) that streams from the
OpenAI-compatible upstream in ``$BENCH_UPSTREAM`` (default ``http://127.0.0.1:9000/v1``) and
``GET /healthz``.  Run one with ``BENCH_UPSTREAM=... uvicorn bench.baselines.tutorial:app --port 8001``.
"""
