"""The command line: ``tokenwire serve``, ``tokenwire ask`` and ``tokenwire doctor``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, TextIO

from ._config import Settings, flag_name, setting_info, shown_default
from ._exceptions import ClientError, ConfigError, TokenwireHTTPError


ASK_KEY_ENV = "TOKENWIRE_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenwire", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (every flag also reads TOKENWIRE_<FLAG>)")
    add_settings_arguments(serve)

    ask = commands.add_parser("ask", help="stream an answer to the terminal")
    ask.add_argument("prompt")
    ask.add_argument("--url", default=os.environ.get("TOKENWIRE_URL", "http://127.0.0.1:8000"))
    ask.add_argument("--model")
    ask.add_argument("--max-tokens", type=int)
    ask.add_argument("--tools", metavar="FILE", help="a JSON file with the tools the model may call (a list)")
    ask.add_argument(
        "--reasoning",
        choices=("minimal", "low", "medium", "high"),
        metavar="EFFORT",
        help="ask the model to reason first, with this effort: %(choices)s",
    )
    ask.add_argument("--no-resume", action="store_true", help="do not reconnect after a network error")
    # The key itself is never a flag: a command line lands in shell history and in `ps`.
    ask.add_argument(
        "--api-key-env",
        metavar="NAME",
        help=f"environment variable holding the server's API key (default {ASK_KEY_ENV}; none if unset)",
    )

    doctor = commands.add_parser(
        "doctor",
        help="find the hop that buffers, compresses or cuts a deployed stream",
        description="Run test streams through URL (the stream route a browser calls, e.g. "
        "https://chat.example.com/api/stream) and judge what arrives. A tokenwire server started with "
        "--diagnostics gets every check; any other SSE endpoint the client-side ones. Exits 1 if a check "
        "fails, 2 if the doctor cannot run.",
    )
    doctor.add_argument("url")
    doctor.add_argument(
        "--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="a header for every request (repeat it), e.g. --header 'Authorization: Bearer <key>'",
    )  # fmt: skip
    doctor.add_argument(
        "--body", metavar="JSON",
        help="the JSON body to POST to a server that is not tokenwire (default: GET); for tokenwire, fields "
        "added to the test streams' bodies",
    )  # fmt: skip
    doctor.add_argument(
        "--idle", type=float, metavar="SECONDS",
        help="also check a stream silent for SECONDS, with the server's heartbeats and without",
    )  # fmt: skip
    doctor.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per test stream")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per field of :class:`Settings`, described by the field."""
    for f in fields(Settings):
        info = setting_info(f)
        words = [info.help.replace("%", "%%")]
        if info.choices is not None:
            words.append("one of %(choices)s")  # expanded (plugins read) only when the help is shown
        default = shown_default(f)
        if type(f.default) is bool:
            # --flag / --no-flag; None, so that TOKENWIRE_* variables and the field's default apply.
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=words[0])
            continue
        if default:
            words.append(f"default: {default}".replace("%", "%%"))
        parser.add_argument(
            flag_name(f.name),
            type=type(f.default),
            choices=info.choices,
            # With choices and no metavar, argparse would list them (and read every plugin) right here.
            metavar=f.name.upper(),
            # None, so that TOKENWIRE_* variables and the field's default apply.
            default=None,
            help="; ".join(words),
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "doctor":
            return doctor(args)
        return ask(args)
    except ConfigError as exc:
        print(f"tokenwire: {exc}", file=sys.stderr)
        return 2


def serve(args: argparse.Namespace) -> int:
    from ._server import serve

    settings = Settings.from_env(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return serve(settings)


def doctor(args: argparse.Namespace) -> int:
    from ._doctor import DoctorError, run_doctor

    headers = {}
    for header in args.header:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise ConfigError(f"--header {header!r}: write it as 'Name: value'")
        headers[name.strip()] = value.strip()
    body = None
    if args.body is not None:
        try:
            body = json.loads(args.body)
        except ValueError as exc:
            raise ConfigError(f"--body is not valid JSON: {exc}") from None
    if args.idle is not None and args.idle <= 0:
        raise ConfigError("--idle must be a number of seconds above 0")
    try:
        report = asyncio.run(run_doctor(args.url, headers=headers, body=body, idle=args.idle, timeout=args.timeout))
    except DoctorError as exc:
        print(f"tokenwire doctor: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 1 if report.failed else 0


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
    if args.tools:
        body["tools"] = _read_tools(args.tools)
    if args.reasoning:
        body["reasoning"] = {"effort": args.reasoning}
    url = args.url.rstrip("/") + "/api/stream"

    printer = AnswerPrinter(sys.stdout, styled=_styled(sys.stdout))

    async def run() -> int:
        async for event in stream_tokens(url, body, headers=headers, resume=not args.no_resume):
            kind = event.get("type")
            if kind == "done":
                printer.end()
                usage = event.get("usage", {})
                reason = event["finish_reason"]
                if event.get("upstream_finish_reason"):
                    reason += f" ({event['upstream_finish_reason']})"
                print(f"[{reason}: {usage.get('completion_tokens')} tokens]", file=sys.stderr)
            elif kind == "error":
                printer.end()
                print(f"[error: {event['error']['message']}]", file=sys.stderr)
                return 1
            else:
                printer.event(event)
        return 0

    try:
        try:
            return asyncio.run(run())
        finally:
            printer.end()  # a Ctrl-C or a cut stream must not leave the terminal dimmed
    except KeyboardInterrupt:
        print("[stopped]", file=sys.stderr)
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


def _read_tools(path: str) -> list[Any]:
    try:
        with open(path, encoding="utf-8") as file:
            tools = json.load(file)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tools {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(tools, list):
        raise ConfigError(
            f'--tools {path} must hold a JSON list: [{{"type": "function", "function": {{"name": ...}}}}]'
        )
    return tools


def _styled(stream: TextIO) -> bool:
    """Whether to dim and colour: a terminal, unless NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


class AnswerPrinter:
    """Writes a stream's output events readably, in the order they come.

    The answer's text goes as it is; everything else is marked so that it cannot
    be taken for the answer: ``[reasoning]`` before a run of reasoning (dimmed on
    a terminal), ``[refusal]`` before a refusal, and each tool call on a line of
    its own once its arguments are complete, ``[tool call get_weather {"city": "Zürich"}]``.
    """

    # ANSI: dim, yellow, cyan, and what resets each.
    STYLES = {
        "reasoning": ("\x1b[2m", "\x1b[22m"),
        "refusal": ("\x1b[33m", "\x1b[39m"),
        "call": ("\x1b[36m", "\x1b[39m"),
    }

    def __init__(self, out: TextIO, *, styled: bool = False) -> None:
        self.out = out
        self.styled = styled
        self.run: str | None = None  # the kind of output being written: "text", "reasoning", "refusal"
        self.line_start = True

    def event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token":
            self._write("text", event["text"])
        elif kind == "reasoning":
            self._write("reasoning", event["text"], "[reasoning] ")
        elif kind == "reasoning_signature":
            self._switch(None)  # a block ends: the next one gets its own mark
        elif kind == "redacted_reasoning":
            self._line("reasoning", "[reasoning, redacted by the provider]")
        elif kind == "refusal":
            self._write("refusal", event["text"], "[refusal] ")
        elif kind == "tool_call_end":
            self._line("call", f"[tool call {event['name']} {event['arguments']}]")
        else:
            return
        self.out.flush()

    def end(self) -> None:
        """Close the last run and the line."""
        self._switch(None)
        if not self.line_start:
            self.out.write("\n")
            self.line_start = True
        self.out.flush()

    def _write(self, run: str, text: str, mark: str = "") -> None:
        if self.run != run:
            self._switch(run)
            self._put(mark)
        self._put(text)

    def _line(self, style: str, text: str) -> None:
        self._switch(None)
        self._newline()
        on, off = self.STYLES[style] if self.styled else ("", "")
        self._put(on + text + off + "\n")

    def _switch(self, run: str | None) -> None:
        """End the run being written (its style, and its line unless it was the answer's text)."""
        if self.run == run:
            return
        if self.run is not None and self.run != "text":
            if self.styled:
                self.out.write(self.STYLES[self.run][1])
            self._newline()
        self.run = run
        if run is not None and run != "text":
            self._newline()
            if self.styled:
                self.out.write(self.STYLES[run][0])

    def _newline(self) -> None:
        if not self.line_start:
            self.out.write("\n")
            self.line_start = True

    def _put(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.line_start = text.endswith("\n")


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
