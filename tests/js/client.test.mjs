// streamTokens against a tiny node:http server on a loopback port: real sockets, real chunking.
import { test as nodeTest, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import http from "node:http";

import { streamTokens, TokenwireError } from "../../src/tokenwire/static/tokenwire.js";

// A client that buffered the whole body would hang the incremental test: fail it instead.
const test = (name, fn) => nodeTest(name, { timeout: 10_000 }, fn);

const unhandled = [];
process.on("unhandledRejection", (reason) => unhandled.push(reason));

afterEach(async () => {
  await new Promise((r) => setTimeout(r, 30)); // let stray rejections surface
  assert.deepEqual(unhandled.splice(0), [], "no unhandled rejections");
});

const SSE_HEADERS = { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache" };
const ev = (seq, obj) => `id: ${seq}\ndata: ${JSON.stringify(obj)}\n\n`;
const start = (id) => ({ type: "start", stream_id: id, model: "scripted" });
const token = (text) => ({ type: "token", text });
const done = (reason = "stop") => ({ type: "done", finish_reason: reason, usage: { prompt_tokens: 1, completion_tokens: 2 } });

/** Everything the server saw, and hooks the tests set per route. */
const seen = [];
const routes = new Map();
let server;
let base;

before(async () => {
  server = http.createServer((req, res) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (d) => (body += d));
    req.on("end", () => {
      const record = { method: req.method, url: req.url, headers: req.headers, body, closed: false };
      seen.push(record);
      res.on("close", () => (record.closed = true));
      const handler = routes.get(`${req.method} ${req.url}`);
      if (!handler) {
        res.writeHead(404, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: { type: "not_found", message: "no such stream" } }));
        return;
      }
      handler(req, res, record);
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server.closeAllConnections();
  server.close();
});

const wait = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(predicate, what, ms = 2000) {
  const t0 = Date.now();
  while (!predicate()) {
    if (Date.now() - t0 > ms) assert.fail(`timed out waiting for ${what}`);
    await wait(5);
  }
}

test("yields events incrementally and stops after done", async () => {
  let release;
  const released = new Promise((r) => (release = r));
  routes.set("POST /inc", async (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "s-inc" });
    res.write(": keepalive\n\n" + ev(1, start("s-inc")) + ev(2, token("Hel")));
    await released; // the client must see the first events before the rest exist
    res.write(ev(3, token("lo ✓ 😀")) + ev(4, done()));
    res.write(ev(5, token("after the end")));
    res.end();
  });
  const got = [];
  for await (const e of streamTokens(`${base}/inc`, { body: { prompt: "hi" }, headers: { "x-custom": "1" } })) {
    got.push(e);
    if (e.type === "token" && e.text === "Hel") release();
  }
  assert.deepEqual(got, [start("s-inc"), token("Hel"), token("lo ✓ 😀"), done()]);
  const post = seen.find((r) => r.url === "/inc");
  assert.equal(post.method, "POST");
  assert.equal(post.headers["content-type"], "application/json");
  assert.equal(post.headers.accept, "text/event-stream");
  assert.equal(post.headers["x-custom"], "1");
  assert.deepEqual(JSON.parse(post.body), { prompt: "hi" });
});

test("yields the error event last and stops", async () => {
  const error = { type: "error", error: { type: "upstream_error", message: "boom", retryable: true } };
  routes.set("POST /err-event", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end(ev(1, start("s")) + ev(2, error) + ev(3, token("never")));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/err-event`, { body: {} })) got.push(e);
  assert.deepEqual(got, [start("s"), error]);
});

test("yields every event type as it is, the ones it does not know too", async () => {
  const events = [
    start("s-types"),
    { type: "reasoning", text: "Think." },
    { type: "reasoning_signature", signature: "sig" },
    { type: "redacted_reasoning", data: "opaque" },
    { type: "refusal", text: "No." },
    { type: "tool_call_start", index: 0, id: "call_1", name: "calculate" },
    { type: "tool_call_delta", index: 0, arguments: '{"expression":"1"}' },
    { type: "tool_call_end", index: 0, id: "call_1", name: "calculate", arguments: '{"expression":"1"}' },
    { type: "from_the_future", extra: [1, { nested: true }] },
    { type: "done", finish_reason: "other", upstream_finish_reason: "pause_turn", usage: { prompt_tokens: null, completion_tokens: 3 } },
  ];
  routes.set("POST /types", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end(events.map((e, i) => ev(i + 1, e)).join(""));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/types`, { body: {} })) got.push(e);
  assert.deepEqual(got, events);
});

test("a 400 JSON error throws TokenwireError with status and error", async () => {
  routes.set("POST /bad", (req, res) => {
    res.writeHead(400, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: { type: "invalid_request", message: "messages is empty", param: "messages" } }));
  });
  await assert.rejects(
    async () => {
      for await (const _ of streamTokens(`${base}/bad`, { body: {} })) assert.fail("no events expected");
    },
    (err) => {
      assert.ok(err instanceof TokenwireError);
      assert.ok(err instanceof Error);
      assert.equal(err.status, 400);
      assert.equal(err.type, "invalid_request");
      assert.equal(err.error.type, "invalid_request");
      assert.equal(err.error.param, "messages");
      assert.match(err.message, /messages is empty/);
      return true;
    },
  );
});

test("a 429 carries Retry-After; a non-JSON error is http_error", async () => {
  routes.set("POST /limited", (req, res) => {
    res.writeHead(429, { "content-type": "application/json", "retry-after": "3" });
    res.end(JSON.stringify({ error: { type: "rate_limited", message: "slow down" } }));
  });
  routes.set("POST /plain", (req, res) => {
    res.writeHead(502, { "content-type": "text/plain" });
    res.end("bad gateway");
  });
  await assert.rejects(streamTokens(`${base}/limited`).next(), (err) => {
    assert.equal(err.status, 429);
    assert.equal(err.type, "rate_limited");
    assert.equal(err.retryAfter, 3);
    return true;
  });
  await assert.rejects(streamTokens(`${base}/plain`).next(), (err) => {
    assert.ok(err instanceof TokenwireError);
    assert.equal(err.status, 502);
    assert.equal(err.type, "http_error");
    assert.equal(err.error, undefined);
    return true;
  });
});

test("a wrong content type throws TokenwireError", async () => {
  routes.set("POST /html", (req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<html>login page</html>");
  });
  await assert.rejects(streamTokens(`${base}/html`, { body: {} }).next(), (err) => {
    assert.ok(err instanceof TokenwireError);
    assert.equal(err.type, "unexpected_content_type");
    assert.equal(err.status, 200);
    return true;
  });
});

test("a stream that ends without done throws stream_cut", async () => {
  routes.set("POST /cut", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end(ev(1, start("s-cut")) + ev(2, token("a")) + "id: 3\ndata: {\"type\":\"tok");
  });
  const got = [];
  await assert.rejects(
    async () => {
      for await (const e of streamTokens(`${base}/cut`, { body: {} })) got.push(e);
    },
    (err) => err instanceof TokenwireError && err.type === "stream_cut",
  );
  assert.deepEqual(got, [start("s-cut"), token("a")]);
});

test("a connection reset mid-stream throws stream_cut", async () => {
  routes.set("POST /reset", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.write(ev(1, start("s-reset")));
    setTimeout(() => res.destroy(), 20);
  });
  await assert.rejects(
    async () => {
      for await (const _ of streamTokens(`${base}/reset`, { body: {} }));
    },
    (err) => err instanceof TokenwireError && err.type === "stream_cut" && err.cause !== undefined,
  );
});

function hangingStream(path, id) {
  routes.set(`POST ${path}`, (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": id });
    res.write(ev(1, start(id)) + ev(2, token("a")));
    // then nothing: the stream stays open until the client goes
  });
}

test("abort while the consumer holds an event ends cleanly and closes the connection", async () => {
  hangingStream("/hang1", "h1");
  const ac = new AbortController();
  const got = [];
  for await (const e of streamTokens(`${base}/hang1`, { body: {}, signal: ac.signal })) {
    got.push(e);
    if (e.type === "token") ac.abort();
  }
  assert.deepEqual(got, [start("h1"), token("a")]);
  const record = seen.find((r) => r.url === "/hang1");
  await until(() => record.closed, "the server to see the disconnect");
  assert.equal(seen.filter((r) => r.method === "DELETE").length, 0, "no DELETE without resume");
});

test("abort while waiting for the next event ends cleanly", async () => {
  hangingStream("/hang2", "h2");
  const ac = new AbortController();
  const got = [];
  for await (const e of streamTokens(`${base}/hang2`, { body: {}, signal: ac.signal })) {
    got.push(e);
    if (e.type === "token") setTimeout(() => ac.abort(), 20);
  }
  assert.equal(got.length, 2);
  const record = seen.find((r) => r.url === "/hang2");
  await until(() => record.closed, "the server to see the disconnect");
});

test("abort before the answer, and an already aborted signal, end cleanly", async () => {
  routes.set("POST /slow-headers", (req, res) => {
    const timer = setTimeout(() => res.end(), 2000);
    res.on("close", () => clearTimeout(timer));
  });
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 20);
  const got = [];
  for await (const e of streamTokens(`${base}/slow-headers`, { body: {}, signal: ac.signal })) got.push(e);
  assert.deepEqual(got, []);
  const before = seen.length;
  for await (const e of streamTokens(`${base}/slow-headers`, { body: {}, signal: AbortSignal.abort() })) got.push(e);
  assert.deepEqual(got, []);
  assert.equal(seen.length, before, "no request when already aborted");
});

test("breaking out of the loop closes the connection", async () => {
  hangingStream("/hang3", "h3");
  for await (const e of streamTokens(`${base}/hang3`, { body: {} })) {
    if (e.type === "start") break;
  }
  const record = seen.find((r) => r.url === "/hang3");
  await until(() => record.closed, "the server to see the disconnect");
});

test("resume: reconnects with GET and Last-Event-ID after a reset and gets the rest exactly once", async () => {
  routes.set("POST /api/r1", (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "r1" });
    res.write("retry: 20\n\n" + ev(1, start("r1")) + ev(2, token("a")) + ev(3, token("b")));
    setTimeout(() => res.destroy(), 20); // the connection drops mid-stream
  });
  routes.set("GET /api/r1/r1", (req, res) => {
    const after = Number(req.headers["last-event-id"] ?? 0);
    res.writeHead(200, SSE_HEADERS);
    const log = [start("r1"), token("a"), token("b"), token("c"), token("d"), done()];
    // a sloppy server replaying one event too many: the client must still deliver each once
    res.end(log.map((e, i) => (i + 1 >= after ? ev(i + 1, e) : "")).join(""));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/api/r1`, { body: { prompt: "x", resumable: true }, resume: true })) got.push(e);
  assert.deepEqual(got, [start("r1"), token("a"), token("b"), token("c"), token("d"), done()]);
  const requests = seen.filter((r) => r.url.startsWith("/api/r1"));
  assert.deepEqual(requests.map((r) => `${r.method} ${r.url}`), ["POST /api/r1", "GET /api/r1/r1"]);
  assert.equal(requests[1].headers["last-event-id"], "3");
  assert.equal(requests[1].headers.accept, "text/event-stream");
  assert.equal(seen.filter((r) => r.method === "DELETE").length, 0, "no DELETE after done");
});

test("a reader's own terminal error carries its cursor as id and is delivered, not skipped", async () => {
  const gone = { type: "error", error: { type: "gone", message: "fell behind", retryable: false } };
  routes.set("POST /api/e1", (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "e1" });
    res.end(ev(1, start("e1")) + ev(2, token("a")) + ev(2, gone));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/api/e1`, { body: { prompt: "x" }, resume: true })) got.push(e);
  assert.deepEqual(got, [start("e1"), token("a"), gone]);
  assert.equal(seen.filter((r) => r.url.startsWith("/api/e1")).length, 1, "an error ends the stream: no resume");
});

test("resume: a POST cut before its answer is sent again with the same Idempotency-Key", async () => {
  let posts = 0;
  routes.set("POST /api/k1", (req, res) => {
    posts += 1;
    if (posts === 1) {
      res.destroy(); // no status line: the client cannot know the stream's id
      return;
    }
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "k1" });
    res.end(ev(1, start("k1")) + ev(2, token("a")) + ev(3, done()));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/api/k1`, { body: { prompt: "x" }, resume: true })) got.push(e);
  assert.deepEqual(got, [start("k1"), token("a"), done()]);
  const requests = seen.filter((r) => r.url === "/api/k1");
  assert.equal(requests.length, 2);
  const [first, second] = requests.map((r) => r.headers["idempotency-key"]);
  assert.ok(first && first.length >= 16, "a random key is sent");
  assert.equal(second, first, "the retry carries the same key");
});

test("without resume a POST gets no Idempotency-Key of its own", async () => {
  routes.set("POST /api/k2", (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "k2" });
    res.end(ev(1, start("k2")) + ev(2, done()));
  });
  for await (const e of streamTokens(`${base}/api/k2`, { body: { prompt: "x" } })) assert.ok(e);
  assert.equal(seen.find((r) => r.url === "/api/k2").headers["idempotency-key"], undefined);
});

test("resume: a clean end without done reconnects too, with backoff over failed attempts", async () => {
  routes.set("POST /api/r2", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end("retry: 10\n\n" + ev(1, start("r2")) + ev(2, token("a")));
  });
  let gets = 0;
  const times = [];
  routes.set("GET /api/r2/r2", (req, res) => {
    times.push(Date.now());
    gets += 1;
    if (gets < 3) {
      res.writeHead(503, { "content-type": "application/json" });
      res.end(JSON.stringify({ error: { type: "overloaded", message: "busy" } }));
      return;
    }
    res.writeHead(200, SSE_HEADERS);
    res.end(ev(3, token("b")) + ev(4, done()));
  });
  const got = [];
  for await (const e of streamTokens(`${base}/api/r2`, { body: {}, resume: true })) got.push(e);
  assert.deepEqual(got, [start("r2"), token("a"), token("b"), done()]);
  assert.equal(gets, 3);
  assert.ok(times[2] - times[1] >= 15, "the delay doubles");
  assert.equal(seen.filter((r) => r.url.startsWith("/api/r2") && r.method === "POST").length, 1, "never re-POST");
});

test("resume: gives up with stream_cut after 5 attempts and cancels the stream", async () => {
  routes.set("POST /api/r3", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end("retry: 1\n\n" + ev(1, start("r3")));
  });
  routes.set("GET /api/r3/r3", (req, res) => {
    res.writeHead(503);
    res.end();
  });
  routes.set("DELETE /api/r3/r3", (req, res) => {
    res.writeHead(204);
    res.end();
  });
  await assert.rejects(
    async () => {
      for await (const _ of streamTokens(`${base}/api/r3`, { body: {}, resume: true }));
    },
    (err) => err instanceof TokenwireError && err.type === "stream_cut",
  );
  assert.equal(seen.filter((r) => r.url === "/api/r3/r3" && r.method === "GET").length, 5);
  await until(() => seen.some((r) => r.url === "/api/r3/r3" && r.method === "DELETE"), "the DELETE");
});

test("resume: a 404 on reconnect throws at once", async () => {
  routes.set("POST /api/r4", (req, res) => {
    res.writeHead(200, SSE_HEADERS);
    res.end("retry: 1\n\n" + ev(1, start("r4")));
  });
  await assert.rejects(
    async () => {
      for await (const _ of streamTokens(`${base}/api/r4`, { body: {}, resume: true }));
    },
    (err) => err instanceof TokenwireError && err.status === 404 && err.type === "not_found",
  );
  assert.equal(seen.filter((r) => r.url === "/api/r4/r4" && r.method === "GET").length, 1);
});

test("resume: abort sends DELETE with the caller's headers and ends cleanly", async () => {
  hangingStream("/api/r5", "r5");
  routes.set("DELETE /api/r5/r5", (req, res) => {
    res.writeHead(204);
    res.end();
  });
  const ac = new AbortController();
  const got = [];
  for await (const e of streamTokens(`${base}/api/r5`, {
    body: {},
    headers: { authorization: "Bearer k" },
    signal: ac.signal,
    resume: true,
  })) {
    got.push(e);
    if (e.type === "token") setTimeout(() => ac.abort(), 10);
  }
  assert.deepEqual(got, [start("r5"), token("a")]);
  await until(() => seen.some((r) => r.url === "/api/r5/r5" && r.method === "DELETE"), "the DELETE");
  const del = seen.find((r) => r.url === "/api/r5/r5" && r.method === "DELETE");
  assert.equal(del.headers.authorization, "Bearer k");
  assert.equal(seen.filter((r) => r.url === "/api/r5/r5" && r.method === "GET").length, 0, "no reconnect after abort");
});

test("resume: abort during the reconnect backoff ends cleanly and sends DELETE", async () => {
  routes.set("POST /api/r6", (req, res) => {
    res.writeHead(200, { ...SSE_HEADERS, "x-stream-id": "r6" });
    res.end("retry: 5000\n\n" + ev(1, start("r6")));
  });
  routes.set("DELETE /api/r6/r6", (req, res) => {
    res.writeHead(204);
    res.end();
  });
  const ac = new AbortController();
  const t0 = Date.now();
  setTimeout(() => ac.abort(), 50);
  const got = [];
  for await (const e of streamTokens(`${base}/api/r6`, { body: {}, signal: ac.signal, resume: true })) got.push(e);
  assert.deepEqual(got, [start("r6")]);
  assert.ok(Date.now() - t0 < 1000, "the backoff is cut short by the abort");
  await until(() => seen.some((r) => r.url === "/api/r6/r6" && r.method === "DELETE"), "the DELETE");
});

test("a custom fetch implementation is used", async () => {
  const calls = [];
  const fakeFetch = async (url, init) => {
    calls.push([url, init.method]);
    return new Response(ev(1, start("f")) + ev(2, done()), { headers: { "content-type": "text/event-stream" } });
  };
  const got = [];
  for await (const e of streamTokens("/api/stream", { body: {}, fetch: fakeFetch })) got.push(e.type);
  assert.deepEqual(got, ["start", "done"]);
  assert.deepEqual(calls, [["/api/stream", "POST"]]);
});

test("data that is not JSON throws invalid_event", async () => {
  const fakeFetch = async () => new Response("data: nope\n\n", { headers: { "content-type": "text/event-stream" } });
  await assert.rejects(
    streamTokens("/x", { fetch: fakeFetch }).next(),
    (err) => err instanceof TokenwireError && err.type === "invalid_event",
  );
});
