"""tokenwire's openai provider on each HTTP client it could use, interleaved in one run.

    python -m bench --only upstream_client      # ~3 minutes (--quick: under 1)

The question: does tokenwire's own HTTP/1.1 client (``providers/_httpclient.py``) earn its place?
Each contender is a tokenwire server of its own, built as ``tokenwire serve --provider openai``
builds one (``python -m bench.upstream_client --transport NAME``), all pinned to the same core and
relaying to the same fake upstream; ``bench.relay.latency`` measures them in turn in every round,
so that the machine's slow spells hit all alike.  Everything but the HTTP client is the same code:
the provider reads every answer through one path (``providers/_http.py``), whichever client
fetched it (``providers/_transport.py``).

- ``tokenwire``: the provider as shipped, on its own client.
- ``httpx``: ``client=httpx.AsyncClient(...)``, set up as the provider sets up the httpx client it
  uses for proxies (HTTP/1.1, no connection cap, 32 idle connections, a connect timeout only):
  httpx's defaults (100 connections, 5 s timeouts) would queue or cut streams at these levels,
  measuring the settings and not the client.
- ``aiohttp``: the same provider on an aiohttp ``ClientSession`` (no connection cap, the same
  keep-alive), through the small :class:`AiohttpTransport` below: aiohttp parses HTTP in C
  (llhttp, as httptools does) and is what httpx users move to for speed, so it is the fair
  contender an own client must beat.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

from tokenwire.providers._transport import ConnectError, ConnectionLost, Exchange, Transport, TransportError

from . import relay, servers
from .loadgen import Target
from .upstream import FakeUpstream

TRANSPORTS = ("tokenwire", "httpx", "aiohttp")
LEVELS = (200, 500)
REPEATS = {"full": 4, "quick": 1}


def server(transport: str, upstream_url: str) -> servers.Server:
    port = servers.free_port()
    argv = [
        sys.executable, "-m", "bench.upstream_client", "--transport", transport, "--base-url", upstream_url,
        "--port", str(port),
    ]  # fmt: skip
    return servers.Server(transport, argv, port)


async def bench(
    upstream: FakeUpstream, plan: relay.Plan, log_dir: Any, server_cpus: set[int] | None, log: Any
) -> dict[str, Any]:
    group = [server(t, upstream.base_url) for t in TRANSPORTS]
    rounds = dataclasses.replace(plan, levels=LEVELS, repeats=REPEATS.get(plan.name, 1))
    try:
        await asyncio.gather(*(asyncio.to_thread(s.start, cpus=server_cpus, log_dir=log_dir) for s in group))
        targets = [Target(s.name, s.port) for s in group]
        out = await relay.latency(upstream, targets, {s.name: s.pid for s in group}, rounds, log)
    finally:
        for s in group:
            s.stop()
    out.pop("cdf", None)
    out["transports"] = list(TRANSPORTS)
    out["repeats"] = rounds.repeats
    return out


# -- aiohttp as a transport -------------------------------------------------------------------


class AiohttpTransport(Transport):
    """Exchanges over one aiohttp ``ClientSession``, made on first use (it needs a running loop)."""

    def __init__(self) -> None:
        self.session: Any = None

    def exchange(self, url: str, headers: Mapping[str, str], content: bytes) -> Exchange:
        return _AiohttpExchange(self, url, headers, content)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _session(self) -> Any:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=5.0),
                timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
                auto_decompress=False,
            )
        return self.session


class _AiohttpExchange(Exchange):
    def __init__(self, transport: AiohttpTransport, url: str, headers: Mapping[str, str], content: bytes) -> None:
        self._transport = transport
        self._request = (url, dict(headers), content)
        self._response: Any = None
        self._aborted = False

    async def send(self) -> None:
        import aiohttp

        url, headers, content = self._request
        try:
            self._response = await self._transport._session().post(url, data=content, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise ConnectError(str(exc)) from exc.os_error
        except aiohttp.ServerDisconnectedError as exc:
            raise ConnectionLost(str(exc)) from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"the request to the upstream failed ({exc})") from None
        if self._aborted:
            self._response.close()
        self.status = self._response.status
        self.headers = {k.lower(): v for k, v in self._response.headers.items()}

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        import aiohttp

        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as exc:
            raise ConnectionLost(str(exc)) from None

    def abort(self) -> None:
        self._aborted = True
        if self._response is not None:
            self._response.close()

    async def aclose(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            # release() pools the connection of a body read to its end and closes any other.
            response.release()


# -- the server: tokenwire serve --provider openai, on one transport ------------------------


def create_provider(transport: str, base_url: str) -> Any:
    from tokenwire.providers._httpx_transport import create_client
    from tokenwire.providers.openai import OpenAIProvider

    if transport == "tokenwire":
        return OpenAIProvider(base_url, model="fake")
    if transport == "httpx":
        return OpenAIProvider(base_url, model="fake", client=create_client(connect_timeout=10.0, max_idle=32))
    if transport == "aiohttp":

        class OnAiohttp(OpenAIProvider):
            def __init__(self) -> None:
                super().__init__(base_url, model="fake")
                self._aiohttp = AiohttpTransport()

            def _transport_for(self, url: str) -> Transport:
                return self._aiohttp

            async def aclose(self) -> None:
                await super().aclose()
                await self._aiohttp.aclose()

        return OnAiohttp()
    raise ValueError(f"unknown transport {transport!r}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream_client")
    parser.add_argument("--transport", choices=TRANSPORTS, required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    import uvicorn

    from tokenwire import Settings, create_app
    from tokenwire._server import create_config

    # As `tokenwire serve` with bench.servers.tokenwire()'s flags: no admission limits, warnings only.
    settings = Settings(
        port=args.port, provider="openai", base_url=args.base_url, model="fake", max_streams=100_000,
        max_streams_per_key=100_000, log_level="warning",
    )  # fmt: skip
    app = create_app(settings, provider=create_provider(args.transport, args.base_url))
    server = uvicorn.Server(create_config(app, settings))
    gc.freeze()
    server.run()


if __name__ == "__main__":
    main()
