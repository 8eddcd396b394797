"""Helpers shared by the Chromium tests: the demo page's state, and the server's log of a stream."""

from __future__ import annotations

import json
import time

import pytest


def status(page) -> dict:
    return page.eval_on_selector("#status", "el => ({text: el.textContent, ...el.dataset})")


def record_output_lengths(page) -> None:
    """Record the output's text length on every DOM mutation, in the page."""
    page.evaluate(
        """() => {
          const output = document.getElementById("output");
          window.__lengths = [];
          new MutationObserver(() => window.__lengths.push(output.textContent.length))
            .observe(output, {childList: true, characterData: true, subtree: true});
        }"""
    )


def record_tool_arguments(page) -> None:
    """Record, in the page, each piece of text added to a tool call block's arguments, in order."""
    page.evaluate(
        """() => {
          window.__argumentPieces = [];
          new MutationObserver((records) => {
            for (const record of records) {
              if (!record.target.matches?.(".tool-call .arguments")) continue;
              for (const node of record.addedNodes) window.__argumentPieces.push(node.textContent);
            }
          }).observe(document.getElementById("conversation"), {childList: true, subtree: true});
        }"""
    )


def tool_blocks(page) -> list[dict]:
    """Every tool call block of the conversation, finished turns and the live one, in order."""
    return page.eval_on_selector_all(
        ".tool-call",
        """blocks => blocks.map(b => ({
          ...b.dataset,
          arguments: b.querySelector(".arguments").textContent,
          result: b.querySelector(".result")?.hidden === false ? b.querySelector(".result").textContent : null,
        }))""",
    )


def server_log(app, stream_id: str) -> list[dict]:
    """The stream's events as the server logged them (read from the test thread: a list copy)."""
    result = app.state.relay.store.read_nowait(stream_id, 0)
    events = []
    for entry in result.entries:
        data = [line[6:] for line in entry.decode().split("\n") if line.startswith("data: ")]
        events.append(json.loads("\n".join(data)))
    return events


def wait_for_server_terminal(app, stream_id: str, timeout: float = 3.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        events = server_log(app, stream_id)
        if events and events[-1]["type"] in ("done", "error"):
            return events
        if time.monotonic() > deadline:
            last = events[-1] if events else None
            pytest.fail(f"the server's log for {stream_id} did not end within {timeout} s (last: {last})")
        time.sleep(0.02)
