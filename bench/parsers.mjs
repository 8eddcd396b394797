// Parser throughput in node: tokenwire.js against eventsource-parser (v3 and v4), MB/s.
//
//   node bench/parsers.mjs FIXTURE_DIR [REPEATS] [MIN_SECONDS] [--check]
//
// Reads every FIXTURE_DIR/*.sse (written by bench/fixtures.py), cuts it into 16 KiB reads, and
// parses it with each parser (two warm-up passes, then the median of at least REPEATS passes and
// MIN_SECONDS, taken in rounds of one pass per parser): text-level (one TextDecoder in stream mode, then feed()) and
// stream-level (a ReadableStream of the reads through parseSSE / TextDecoderStream +
// EventSourceParserStream). Prints JSON: {fixture: {parser: {mb_per_s, events, digest}}}.
// The digest is sha256 of the events as [[event, data, id], ...], as bench/parsers.py computes it.
// --check: one pass each, no timing (for tests/test_bench_fixtures.py).

import { createHash } from "node:crypto";
import { readdirSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { fileURLToPath } from "node:url";

import { createParser as createParser3 } from "eventsource-parser";
import { EventSourceParserStream as Stream3 } from "eventsource-parser/stream";
import { createParser as createParser4 } from "eventsource-parser-4";
import { EventSourceParserStream as Stream4 } from "eventsource-parser-4/stream";

const here = fileURLToPath(new URL(".", import.meta.url));
const { SSEParser, parseSSE } = await import(join(here, "..", "src", "tokenwire", "static", "tokenwire.js"));

const READ_SIZE = 16 * 1024;

// Every parser hands each event to `sink`: timed passes count them, the check pass normalizes them
// to [event, data, id] (so the timing is the parser's, not the normalization's).
const norm = (e) => [e.event || "message", e.data, e.id ?? ""];

function tokenwireFeed(reads, sink) {
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  const parser = new SSEParser();
  for (const chunk of reads) {
    for (const e of parser.feed(decoder.decode(chunk, { stream: true }))) sink(e);
  }
  for (const e of parser.feed(decoder.decode())) sink(e);
  parser.end();
}

function espFeed(createParser) {
  return (reads, sink) => {
    const decoder = new TextDecoder();
    const parser = createParser({ onEvent: sink });
    for (const chunk of reads) parser.feed(decoder.decode(chunk, { stream: true }));
    parser.feed(decoder.decode());
  };
}

function bodyOf(reads) {
  let i = 0;
  return new ReadableStream({
    pull(controller) {
      if (i < reads.length) controller.enqueue(reads[i++]);
      else controller.close();
    },
  });
}

async function tokenwireStream(reads, sink) {
  for await (const e of parseSSE(bodyOf(reads))) sink(e);
}

function espStream(StreamClass) {
  return async (reads, sink) => {
    const events = bodyOf(reads).pipeThrough(new TextDecoderStream()).pipeThrough(new StreamClass());
    for await (const e of events) sink(e);
  };
}

const PARSERS = {
  "tokenwire.js SSEParser": tokenwireFeed,
  "eventsource-parser 3": espFeed(createParser3),
  "eventsource-parser 4": espFeed(createParser4),
  "tokenwire.js parseSSE (stream)": tokenwireStream,
  "EventSourceParserStream 3 (stream)": espStream(Stream3),
  "EventSourceParserStream 4 (stream)": espStream(Stream4),
};

function digest(events) {
  return createHash("sha256").update(JSON.stringify(events)).digest("hex");
}

const args = process.argv.slice(2);
const check = args.includes("--check");
const [dir, repeatsArg = "5", minArg = "0.5"] = args.filter((a) => a !== "--check");
const repeats = Number(repeatsArg);
const MIN_SECONDS = Number(minArg); // per parser and fixture: at least this long, and at least REPEATS passes
const result = {};
for (const file of readdirSync(dir).filter((f) => f.endsWith(".sse")).sort()) {
  const blob = new Uint8Array(readFileSync(join(dir, file)));
  const reads = [];
  for (let i = 0; i < blob.length; i += READ_SIZE) reads.push(blob.subarray(i, i + READ_SIZE));
  const row = {};
  const times = {};
  const spent = {};
  let count = 0;
  const counter = () => {
    count += 1;
  };
  for (const [name, parse] of Object.entries(PARSERS)) {
    const events = [];
    await parse(reads, (e) => events.push(norm(e))); // warm-up, and the events for the digest
    if (!check) await parse(reads, counter); // a second warm-up for the JIT
    row[name] = { mb_per_s: NaN, events: events.length, digest: digest(events) };
    times[name] = [];
    spent[name] = 0;
  }
  // Timed passes in rounds, one pass of every parser per round, so that a slow spell of the
  // machine (another process, a GC of the harness) lands on all of them rather than on one.
  const names = Object.keys(PARSERS);
  while (!check && names.some((n) => times[n].length < repeats || spent[n] < MIN_SECONDS)) {
    for (const name of names) {
      const t0 = process.hrtime.bigint();
      await PARSERS[name](reads, counter);
      const t = Number(process.hrtime.bigint() - t0) / 1e9;
      times[name].push(t);
      spent[name] += t;
    }
  }
  for (const name of names) {
    const sorted = times[name].sort((a, b) => a - b);
    if (sorted.length) row[name].mb_per_s = blob.length / sorted[Math.floor(sorted.length / 2)] / 1e6;
  }
  result[basename(file, ".sse")] = row;
}
process.stdout.write(JSON.stringify(result));
