// MessageAccumulator: one answer assembled from its stream's events, and the assistant message
// sent back with the tool results (docs/protocol.md, "Tool calls" and "Reasoning").
import { test } from "node:test";
import assert from "node:assert/strict";

import { MessageAccumulator, streamTokens } from "../../src/tokenwire/static/tokenwire.js";

const start = { type: "start", stream_id: "str_1", model: "scripted" };
const usage = { prompt_tokens: 31, completion_tokens: 18 };
const done = (reason) => ({ type: "done", finish_reason: reason, usage });
const callStart = (index, id, name) => ({ type: "tool_call_start", index, id, name });
const callDelta = (index, args) => ({ type: "tool_call_delta", index, arguments: args });
const callEnd = (index, id, name, args) => ({ type: "tool_call_end", index, id, name, arguments: args });
const reasoning = (text) => ({ type: "reasoning", text });
const signature = (sig) => ({ type: "reasoning_signature", signature: sig });
const redacted = (data) => ({ type: "redacted_reasoning", data });

/** @param {object[]} events */
function accumulate(events) {
  const answer = new MessageAccumulator();
  for (const event of events) answer.add(event);
  return answer;
}

// The protocol's own example: two parallel calls, as OpenAI streams them, interleaved.
const PARALLEL = [
  start,
  callStart(0, "call_a", "get_weather"),
  callDelta(0, '{"city":'),
  callStart(1, "call_b", "get_time"),
  callDelta(1, '{"tz":"CET"}'),
  callDelta(0, '"Zürich"}'),
  callEnd(0, "call_a", "get_weather", '{"city":"Zürich"}'),
  callEnd(1, "call_b", "get_time", '{"tz":"CET"}'),
  done("tool_calls"),
];

test("interleaved parallel calls: arguments grow per index, input once ended", () => {
  const answer = new MessageAccumulator();
  for (const event of PARALLEL.slice(0, 5)) answer.add(event);
  assert.deepEqual(answer.toolCalls, [
    { index: 0, id: "call_a", name: "get_weather", arguments: '{"city":', input: undefined, error: undefined, done: false },
    { index: 1, id: "call_b", name: "get_time", arguments: '{"tz":"CET"}', input: undefined, error: undefined, done: false },
  ]);
  assert.equal(answer.finishReason, null);
  // A call still streaming cannot be run: it is not in the message yet.
  assert.deepEqual(answer.toMessage(), { role: "assistant", content: "" });

  for (const event of PARALLEL.slice(5, 7)) answer.add(event);
  const [weather, time] = answer.toolCalls;
  assert.deepEqual([weather.done, weather.input, weather.error], [true, { city: "Zürich" }, undefined]);
  assert.deepEqual([time.done, time.input], [false, undefined]);

  for (const event of PARALLEL.slice(7)) answer.add(event);
  assert.equal(answer.finishReason, "tool_calls");
  assert.deepEqual(answer.usage, usage);
  assert.deepEqual(
    answer.toolCalls.map((call) => [call.index, call.input, call.done]),
    [[0, { city: "Zürich" }, true], [1, { tz: "CET" }, true]],
  );
  assert.deepEqual(answer.toMessage(), {
    role: "assistant",
    content: null,
    tool_calls: [
      { id: "call_a", type: "function", function: { name: "get_weather", arguments: '{"city":"Zürich"}' } },
      { id: "call_b", type: "function", function: { name: "get_time", arguments: '{"tz":"CET"}' } },
    ],
  });
});

test("text before a call is the message's content; calls come in index order", () => {
  const answer = accumulate([
    { type: "token", text: "Let me " },
    { type: "token", text: "check." },
    callStart(1, "call_2", "b"), // not the server's order: the accumulator sorts by index anyway
    callStart(0, "call_1", "a"),
    callEnd(1, "call_2", "b", "{}"),
    callEnd(0, "call_1", "a", "{}"),
    done("tool_calls"),
  ]);
  const message = answer.toMessage();
  assert.equal(message.content, "Let me check.");
  assert.deepEqual(message.tool_calls.map((call) => call.id), ["call_1", "call_2"]);
});

// Every byte split of the wire, with fragments cut inside a JSON string, inside an escape, and
// right after a two-byte and a four-byte character: the events must come out whole and the
// fragments join to the whole arguments.
test("arguments split inside strings and multi-byte characters, over every byte split of the wire", async () => {
  const args = '{"city":"Zürich \\"Nord\\" 😀","n":1}';
  const fragments = ['{"city":"Zü', 'rich \\"No', 'rd\\" 😀', '","n":1}'];
  assert.equal(fragments.join(""), args);
  const events = [
    start,
    callStart(0, "call_1", "get_weather"),
    ...fragments.map((f) => callDelta(0, f)),
    callEnd(0, "call_1", "get_weather", args),
    done("tool_calls"),
  ];
  const wire = new TextEncoder().encode(events.map((e, i) => `id: ${i + 1}\ndata: ${JSON.stringify(e)}\n\n`).join(""));
  const expected = { city: 'Zürich "Nord" 😀', n: 1 };

  /** @param {Uint8Array[]} chunks */
  async function run(chunks) {
    const fakeFetch = async () =>
      new Response(
        new ReadableStream({
          start(controller) {
            for (const chunk of chunks) controller.enqueue(chunk);
            controller.close();
          },
        }),
        { headers: { "content-type": "text/event-stream" } },
      );
    const answer = new MessageAccumulator();
    const seen = [];
    for await (const event of streamTokens("/api/stream", { body: {}, fetch: fakeFetch })) {
      answer.add(event);
      if (event.type === "tool_call_delta") seen.push(answer.toolCalls[0].arguments);
    }
    return { answer, seen };
  }

  for (let cut = 1; cut < wire.length; cut++) {
    const { answer, seen } = await run([wire.subarray(0, cut), wire.subarray(cut)]);
    const [call] = answer.toolCalls;
    assert.deepEqual([call.arguments, call.input, call.done], [args, expected, true], `split at byte ${cut}`);
    assert.deepEqual(seen, ['{"city":"Zü', '{"city":"Zürich \\"No', '{"city":"Zürich \\"Nord\\" 😀', args]);
  }
  const { answer } = await run([...wire].map((byte) => Uint8Array.of(byte)));
  assert.deepEqual(answer.toolCalls[0].input, expected, "one byte per chunk");
});

test("each reasoning_signature closes a block; trailing unsigned text is a block without one", () => {
  const answer = accumulate([
    reasoning("First "),
    reasoning("thought."),
    signature("sig-1"),
    reasoning("Second."),
    signature("sig-2"),
    reasoning("Unsigned "),
    reasoning("tail."),
  ]);
  const blocks = [
    { type: "reasoning", text: "First thought.", signature: "sig-1" },
    { type: "reasoning", text: "Second.", signature: "sig-2" },
    { type: "reasoning", text: "Unsigned tail." },
  ];
  assert.deepEqual(answer.reasoning, blocks);
  answer.add({ type: "token", text: "Answer." });
  answer.add(done("stop"));
  assert.deepEqual(answer.toMessage(), { role: "assistant", content: "Answer.", reasoning: blocks });
});

test("redacted blocks keep their place; a signature with no text before it signs an empty block", () => {
  const answer = accumulate([
    reasoning("Open."),
    redacted("EmwK-1"),
    redacted("EmwK-2"),
    signature("sig-empty"),
    reasoning("Last."),
    signature("sig-last"),
    callStart(0, "toolu_1", "calculate"),
    callDelta(0, '{"expression":"1+1"}'),
    callEnd(0, "toolu_1", "calculate", '{"expression":"1+1"}'),
    done("tool_calls"),
  ]);
  assert.deepEqual(answer.toMessage(), {
    role: "assistant",
    content: null,
    tool_calls: [{ id: "toolu_1", type: "function", function: { name: "calculate", arguments: '{"expression":"1+1"}' } }],
    reasoning: [
      { type: "reasoning", text: "Open." },
      { type: "redacted_reasoning", data: "EmwK-1" },
      { type: "redacted_reasoning", data: "EmwK-2" },
      { type: "reasoning", text: "", signature: "sig-empty" },
      { type: "reasoning", text: "Last.", signature: "sig-last" },
    ],
  });
});

test("a refusal is kept apart from the text and out of the message", () => {
  const answer = accumulate([
    start,
    { type: "refusal", text: "I can't" },
    { type: "refusal", text: " help with that." },
    done("content_filter"),
  ]);
  assert.equal(answer.refusal, "I can't help with that.");
  assert.equal(answer.text, "");
  assert.equal(answer.finishReason, "content_filter");
  assert.deepEqual(answer.toMessage(), { role: "assistant", content: "" });
});

test("invalid or non-object arguments: the call ends with an error and goes back as the model sent it", () => {
  const answer = accumulate([
    callStart(0, "call_1", "calculate"),
    callDelta(0, '{"expression": "2+'),
    callEnd(0, "call_1", "calculate", '{"expression": "2+'),
    callStart(1, "call_2", "calculate"),
    callDelta(1, "[1, 2]"),
    callEnd(1, "call_2", "calculate", "[1, 2]"),
    callStart(2, "call_3", "get_time"),
    callDelta(2, "{}"),
    callEnd(2, "call_3", "get_time", "{}"),
    done("tool_calls"),
  ]);
  const [broken, array, empty] = answer.toolCalls;
  assert.equal(broken.done, true);
  assert.equal(broken.input, undefined);
  assert.match(broken.error, /^the arguments are not valid JSON: /);
  assert.deepEqual([array.input, array.error], [undefined, "the arguments are a JSON array, not an object"]);
  assert.deepEqual([empty.input, empty.error], [{}, undefined]);
  assert.deepEqual(
    answer.toMessage().tool_calls.map((call) => call.function.arguments),
    ['{"expression": "2+', "[1, 2]", "{}"],
  );
});

test("a stream stopped inside a call's arguments leaves the call out of the message", () => {
  const answer = accumulate([
    { type: "token", text: "Computing." },
    callStart(0, "call_1", "calculate"),
    callDelta(0, '{"expr'),
    done("cancelled"),
  ]);
  assert.deepEqual(answer.toolCalls.map((call) => [call.arguments, call.done]), [['{"expr', false]]);
  assert.equal(answer.finishReason, "cancelled");
  assert.deepEqual(answer.toMessage(), { role: "assistant", content: "Computing." });
});

test("done's upstream reason and an error event are kept; unknown events are ignored", () => {
  const answer = accumulate([
    start,
    { type: "queued", position: 1 },
    { type: "some_future_event", text: "not text" },
    { type: "token", text: "Hi" },
    { type: "done", finish_reason: "other", upstream_finish_reason: "pause_turn", usage },
  ]);
  assert.equal(answer.text, "Hi");
  assert.deepEqual([answer.finishReason, answer.upstreamFinishReason], ["other", "pause_turn"]);
  assert.equal(answer.error, null);

  const failed = accumulate([{ type: "error", error: { type: "upstream_error", message: "boom", retryable: true } }]);
  assert.deepEqual(failed.error, { type: "upstream_error", message: "boom", retryable: true });
  assert.equal(failed.finishReason, null);
});

test("getters give copies: changing them changes nothing inside", () => {
  const answer = accumulate([reasoning("r"), signature("s"), ...PARALLEL]);
  answer.toolCalls[0].arguments = "changed";
  answer.reasoning[0].text = "changed";
  answer.toMessage().tool_calls[0].function.name = "changed";
  assert.equal(answer.toolCalls[0].arguments, '{"city":"Zürich"}');
  assert.deepEqual(answer.reasoning, [{ type: "reasoning", text: "r", signature: "s" }]);
  assert.equal(answer.toMessage().tool_calls[0].function.name, "get_weather");
});
