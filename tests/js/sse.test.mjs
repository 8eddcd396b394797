// The browser client's SSE parser against the shared conformance cases (tests/fixtures/sse/cases.json),
// the same cases tests/test_sse.py runs against the Python decoder.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

import { SSEParser, parseSSE } from "../../src/tokenwire/static/tokenwire.js";

const cases = JSON.parse(readFileSync(new URL("../fixtures/sse/cases.json", import.meta.url), "utf8"));

/** @param {{input?: string, input_hex?: string}} c */
function caseBytes(c) {
  return c.input_hex !== undefined ? new Uint8Array(Buffer.from(c.input_hex, "hex")) : new TextEncoder().encode(c.input);
}

/** A ReadableStream that delivers exactly these chunks. */
function streamOf(chunks) {
  let i = 0;
  return new ReadableStream({
    pull(controller) {
      if (i < chunks.length) controller.enqueue(chunks[i++]);
      else controller.close();
    },
  });
}

async function parseChunks(chunks) {
  const events = [];
  for await (const ev of parseSSE(streamOf(chunks))) events.push(ev);
  return events;
}

function feedStrings(strings) {
  const parser = new SSEParser();
  const events = [];
  for (const s of strings) events.push(...parser.feed(s));
  events.push(...parser.end());
  return events;
}

test("the cases file is well formed", () => {
  assert.ok(cases.length >= 40);
  assert.equal(new Set(cases.map((c) => c.name)).size, cases.length);
});

for (const c of cases) {
  test(`parseSSE: ${c.name}`, async () => {
    const bytes = caseBytes(c);
    assert.deepEqual(await parseChunks([bytes]), c.events, "whole input");
    for (let i = 0; i <= bytes.length; i++) {
      assert.deepEqual(await parseChunks([bytes.subarray(0, i), bytes.subarray(i)]), c.events, `split at byte ${i}`);
    }
    const single = Array.from(bytes, (_, i) => bytes.subarray(i, i + 1));
    assert.deepEqual(await parseChunks(single), c.events, "one byte at a time");
  });

  if (c.input !== undefined) {
    test(`SSEParser: ${c.name}`, () => {
      const text = c.input;
      assert.deepEqual(feedStrings([text]), c.events, "whole input");
      for (let i = 0; i <= text.length; i++) {
        assert.deepEqual(feedStrings([text.slice(0, i), "", text.slice(i)]), c.events, `split at ${i}`);
      }
      assert.deepEqual(feedStrings(text.split("")), c.events, "one code unit at a time");
    });
  }
}

test("onRetry is called for a retry-only block", async () => {
  const seen = [];
  const events = [];
  for await (const ev of parseSSE(streamOf([new TextEncoder().encode("retry: 250\n\nretry: x\n\ndata: a\n\n")]), {
    onRetry: (ms) => seen.push(ms),
  })) {
    events.push(ev);
  }
  assert.deepEqual(seen, [250]);
  assert.deepEqual(events, [{ event: "message", data: "a", id: "", retry: 250 }]);
});

test("breaking out of parseSSE cancels the stream", async () => {
  let cancelled = false;
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(new TextEncoder().encode("data: a\n\n"));
    },
    cancel() {
      cancelled = true;
    },
  });
  for await (const ev of parseSSE(body)) {
    assert.equal(ev.data, "a");
    break;
  }
  await new Promise((r) => setTimeout(r, 0));
  assert.ok(cancelled);
  assert.equal(body.locked, false);
});

test("a stream error propagates out of parseSSE", async () => {
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(new TextEncoder().encode("data: a\n\n"));
      controller.error(new Error("boom"));
    },
  });
  const got = [];
  await assert.rejects(async () => {
    for await (const ev of parseSSE(body)) got.push(ev.data);
  }, /boom/);
});

test("SSEParser keeps the last event id and retry after end()", () => {
  const parser = new SSEParser();
  parser.feed("id: 5\nretry: 10\ndata: pending\n");
  parser.end();
  assert.equal(parser.lastEventId, "5");
  assert.equal(parser.retry, 10);
  assert.deepEqual(parser.feed("data: next\n\n"), [{ event: "message", data: "next", id: "5", retry: 10 }]);
});

test("SSEParser is linear on long lines and many events", () => {
  const parser = new SSEParser();
  const long = "x".repeat(1 << 20);
  const t0 = performance.now();
  for (let i = 0; i < long.length; i += 1000) parser.feed(i === 0 ? "data: " + long.slice(0, 1000) : long.slice(i, i + 1000));
  assert.equal(parser.feed("\n\n")[0].data.length, long.length);
  const many = 'id: 1\ndata: {"type":"token","text":"hi"}\n\n'.repeat(50_000);
  assert.equal(parser.feed(many).length, 50_000);
  const mixed = "data: a\rdata: b\r\n".repeat(20_000) + "\n";
  assert.equal(parser.feed(mixed)[0].data.length, 4 * 20_000 - 1);
  assert.ok(performance.now() - t0 < 2000, "parsing took too long");
});
