"""The command line: ``tokenwire serve`` and ``tokenwire ask``."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Sequence

from ._config import PROVIDERS, Settings
from ._exceptions import ClientError, ConfigError, TokenwireHTTPError


ASK_KEY_ENV = "TOKENWIRE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (every flag also reads TOKENWIRE_<FLAG>)")
    # Defaults are None so that TOKENWIRE_* variables and Settings' defaults apply.
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--provider", choices=PROVIDERS, help="model backend (default local)")
    serve.add_argument("--base-url", help="upstream base URL for openai/anthropic, e.g. http://127.0.0.1:8080/v1")
    serve.add_argument("--model", help="model name sent upstream / reported in start events")
    serve.add_argument("--model-path", help="GGUF file for the local provider (default: bundled SmolLM2-135M)")
    serve.add_argument("--api-key-env", help="name of the environment variable holding the upstream API key")
    serve.add_argument("--heartbeat", type=float, help="seconds of silence before a keepalive comment (15)")
    serve.add_argument("--max-duration", type=float, help="deadline of one generation in seconds (600)")
    serve.add_argument("--resume-grace", type=float, help="seconds a resumable stream outlives its client (30)")
    serve.add_argument("--retry-ms", type=int, help="reconnection delay sent to clients as 'retry:' (1000)")
    serve.add_argument("--send-timeout", type=float, help="drop a client that stops reading after S s (30)")
    serve.add_argument("--store", help="memory or redis://HOST:PORT/DB (default memory)")
    serve.add_argument("--first-token-timeout", type=float, help="upstream silence before the first token (120)")
    serve.add_argument("--idle-timeout", type=float, help="upstream silence between two tokens (60)")
    serve.add_argument("--connect-timeout", type=float, help="upstream connect timeout (10)")
    serve.add_argument("--max-body", type=int, help="request body limit in bytes (1 MiB)")
    serve.add_argument("--auth-keys-file", help="require 'Authorization: Bearer <key>' with a key from this file")
    serve.add_argument("--max-streams", type=int, help="streams running at once before 503 (512)")
    serve.add_argument("--max-streams-per-key", type=int, help="streams per API key before 429 (32)")
    serve.add_argument("--head-timeout", type=float,
                       help="seconds for a request's line and headers to arrive; then 408 and close (10)")
    serve.add_argument("--body-timeout", type=float,
                       help="seconds for a whole request body to arrive after its headers; then 408, close (30)")
    serve.add_argument("--max-header-bytes", type=int,
                       help="size of a request's header section before 431 (65536; the request line: 64 KiB)")
    serve.add_argument("--max-connections", type=int,
                       help="open connections before new ones get 503; every running stream and resume holds "
                       "one, as does each idle keep-alive connection: keep it above --max-streams (2048)")
    serve.add_argument("--config", help="routes file (TOML): model -> provider, base_url, model, api_key_env")
    serve.add_argument("--cors-origins", help="comma-separated origins allowed to call the API (CORS off by default)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    ask = commands.add_parser("ask", help="stream an answer to the terminal")
    ask.add_argument("prompt")
    ask.add_argument("--url", default=os.environ.get("TOKENWIRE_URL", "http://127.0.0.1:8000"))
    ask.add_argument("--model")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--no-resume", action="store_true", help="do not reconnect after a network error")
    # The key itself is never a flag: a command line lands in shell history and in `ps`.
    ask.add_argument(
        "--api-key-env",
        metavar="NAME",
        help=f"environment variable holding the server's API key (default {ASK_KEY_ENV}; none if unset)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        return ask(args)
    except ConfigError as exc:
        print(f"tokenwire: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ._app import create_app
    from ._server import create_config

    overrides = {
        name: getattr(args, name)
        for name in (
            "host", "port", "provider", "base_url", "model", "model_path", "api_key_env", "heartbeat",
            "max_duration", "resume_grace", "send_timeout", "store", "log_level", "first_token_timeout",
            "idle_timeout", "connect_timeout", "max_body", "auth_keys_file", "max_streams", "max_streams_per_key",
            "cors_origins", "config", "retry_ms", "head_timeout", "body_timeout", "max_header_bytes",
            "max_connections",
        )
    }
    settings = Settings.from_env(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    server = uvicorn.Server(create_config(app, settings))
    # Everything made so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stall every stream for tens of ms.
    gc.freeze()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    print(f"tokenwire: {settings.provider} provider; open http://{host}:{settings.port}/", flush=True)
    server.run()
    return 0


def ask(args: argparse.Namespace) -> int:
    import httpx

    from ._client import stream_tokens

    key_env = args.api_key_env or ASK_KEY_ENV
    key = os.environ.get(key_env, "").strip()  # the server strips the key it is sent too
    if args.api_key_env and not key:
        # Asked for a key by name: going on without one would only end in a 401.
        raise ConfigError(f"--api-key-env names {key_env}, which is not set: export {key_env}=<your key>")
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body: dict[str, object] = {"prompt": args.prompt}
    if args.model:
        body["model"] = args.model
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    url = args.url.rstrip("/") + "/api/stream"

    async def run() -> int:
        async for event in stream_tokens(url, body, headers=headers, resume=not args.no_resume):
            kind = event.get("type")
            if kind in ("token", "reasoning"):
                sys.stdout.write(event["text"])
                sys.stdout.flush()
            elif kind == "done":
                sys.stdout.write("\n")
                usage = event.get("usage", {})
                print(
                    f"[{event['finish_reason']}: {usage.get('completion_tokens')} tokens]", file=sys.stderr
                )
            elif kind == "error":
                print(f"\n[error: {event['error']['message']}]", file=sys.stderr)
                return 1
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
        return 130
    except TokenwireHTTPError as exc:
        if exc.status_code == 401:
            print(f"tokenwire: {_unauthorized_advice(key_env, bool(key))}", file=sys.stderr)
        else:
            print(f"tokenwire: {exc}", file=sys.stderr)
        return 1
    except ClientError as exc:
        print(f"tokenwire: {exc}", file=sys.stderr)
        return 1
    except (OSError, httpx.TransportError) as exc:
        print(f"tokenwire: cannot reach {url}: {exc}", file=sys.stderr)
        return 1


def _unauthorized_advice(key_env: str, sent: bool) -> str:
    """What to do about a 401 (never the key: the message may end up in a bug report)."""
    if sent:
        return (
            f"the server refused the API key in {key_env} (HTTP 401): "
            f"set {key_env} to a key from the server's --auth-keys-file"
        )
    return (
        f"the server requires an API key (HTTP 401): set {key_env}=<your key>, "
        "or name another variable with --api-key-env"
    )
