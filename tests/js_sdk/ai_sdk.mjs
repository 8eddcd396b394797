// The Vercel AI SDK (`ai` npm package) against tokenwire's POST /api/chat.
//
//   node tests/js_sdk/ai_sdk.mjs <base_url> <case> [package]
//
// `package` is the `ai` release whose transport and readUIMessageStream run the case: `ai` (6.0.326,
// the default) or `ai-5` (5.0.277, the last 5.x line).
//
// Prints one JSON line with what the SDK made of the answer; tests/test_ai_sdk_node.py asserts on it.
// Requests go through `DefaultChatTransport`, the transport `useChat` uses: it posts the UIMessages and
// parses the answer into UI message chunks with the package's own chunk schema, so a chunk it refuses
// fails the case. Messages are assembled with `readUIMessageStream`, as `useChat` assembles them.
//
// `ai` 6.0.231 and later accept chunk fields they do not know (z.looseObject); 6.0.0 to 6.0.230 refuse
// them (z.strictObject), and apps pinned to those still run. So every chunk is also checked against
// 6.0.230's schema (bench/package.json installs it as `ai-6.0.230`), and against 5.0.277's.
//
// All are installed in bench/node_modules (`npm ci --prefix bench`), which node's resolution from this
// file would not search (ES modules ignore NODE_PATH), so they are required from bench/package.json.
import { createRequire } from "node:module";
import { once } from "node:events";

const require = createRequire(new URL("../../bench/package.json", import.meta.url));
const [baseURL, name, pkg = "ai"] = process.argv.slice(2);
const { DefaultChatTransport, readUIMessageStream } = require(pkg);
// Each release's chunk schema, by the version it came from.
const SCHEMAS = Object.fromEntries(
  ["ai", "ai-6.0.230", "ai-5"].map((each) => [
    require(`${each}/package.json`).version,
    require(each).uiMessageChunkSchema,
  ]),
);
// tokenwire.js, served to browsers, is a plain ES module: node imports it as it is.
const { tokenwireChatTransport } = await import("../../src/tokenwire/static/tokenwire.js");

const transport = new DefaultChatTransport({ api: baseURL + "/api/chat" });
const question = { id: "msg_user_1", role: "user", parts: [{ type: "text", text: "Weather and time?" }] };
// What the app's tools answered, for the second turn; the test checks the upstream got them as JSON text.
const OUTPUTS = {
  "tool-get_weather": { temperature: 21, unit: "c", sky: "sunny ☀" },
  "tool-get_time": { time: "14:05" },
};

function send(messages, abortSignal) {
  return transport.sendMessages({
    chatId: "chat-1", messages, trigger: "submit-message", messageId: undefined, abortSignal,
  });
}

// Reads the transport's chunks and, from a copy of them, the message `readUIMessageStream` assembles;
// also what either refused: an error ending the chunk stream, or one readUIMessageStream reports.
async function converse(messages) {
  return collect(await send(messages));
}

async function collect(stream) {
  const [forChunks, forMessage] = stream.tee();
  const chunks = [];
  const errors = [];
  const collecting = (async () => {
    try {
      for await (const chunk of forChunks) chunks.push(chunk);
    } catch (caught) {
      errors.push(`transport: ${caught}`);
    }
  })();
  let message = null;
  try {
    const onError = (error) => errors.push(`read: ${error}`);
    for await (const snapshot of readUIMessageStream({ stream: forMessage, onError })) {
      message = snapshot;
    }
  } catch (caught) {
    errors.push(`read: ${caught}`);
  }
  await collecting;
  return { chunks, message, errors, invalid: await invalidChunks(chunks) };
}

// Every chunk a release's schema refuses, with why.
async function invalidChunks(chunks) {
  const invalid = [];
  for (const [index, chunk] of chunks.entries()) {
    for (const [version, schema] of Object.entries(SCHEMAS)) {
      const result = await schema().validate(chunk);
      if (!result.success) invalid.push({ index, version, chunk, error: String(result.error) });
    }
  }
  return invalid;
}

const cases = {
  async chat() {
    return converse([question]);
  },

  // The first turn, then that answer sent back with its calls answered, as useChat sends it after
  // `addToolResult`: the assistant message with its tool parts given outputs, and nothing after it.
  async second_turn() {
    const first = await converse([question]);
    const answered = {
      ...first.message,
      parts: first.message.parts.map((part) =>
        part.type in OUTPUTS ? { ...part, state: "output-available", output: OUTPUTS[part.type] } : part,
      ),
    };
    const second = await converse([question, answered]);
    return { first, sent: answered, second };
  },

  // A resumable chat whose connection drops after three text deltas (its fetch aborted, which on a
  // resumable chat only drops the connection), then recovered with `reconnectToStream`, as
  // `useChat({resume: true})` does on mount: the whole answer from its start. Once it has finished
  // there is nothing to resume: the server answers 204, which the transport returns as null.
  async resume() {
    const chatId = `chat-resume-${process.pid}`;
    const resumable = new DefaultChatTransport({ api: baseURL + "/api/chat", body: { resumable: true } });
    const controller = new AbortController();
    const stream = await resumable.sendMessages({
      chatId, messages: [question], trigger: "submit-message", messageId: undefined, abortSignal: controller.signal,
    });
    const cut = [];
    try {
      for await (const chunk of stream) {
        if (chunk.type === "text-delta" && cut.push(chunk.delta) === 3) controller.abort();
      }
    } catch (caught) {
      if (caught.name !== "AbortError") throw caught;
    }
    const resumed = await resumable.reconnectToStream({ chatId });
    const recovered = resumed === null ? null : await collect(resumed);
    const afterwards = await resumable.reconnectToStream({ chatId });
    return { cut, recovered, afterwards };
  },

  // Aborts after the first text-delta chunk, reports, then stays alive until stdin closes: the test
  // checks the upstream's socket while this process (and so its sockets) still exists, so only the
  // abort itself can have closed it.
  async abort() {
    return abortAfterFirstText(DefaultChatTransport, {});
  },

  // The same on a resumable chat, through DefaultChatTransport (the server keeps generating: resume
  // cannot tell a Stop from a dropped connection) and through tokenwire's transport (its abort also
  // sends DELETE, so Stop stops the model).
  async abort_resumable_default() {
    return abortAfterFirstText(DefaultChatTransport, { resumable: true });
  },
  async abort_resumable_tokenwire() {
    return abortAfterFirstText(tokenwireChatTransport(DefaultChatTransport), { resumable: true });
  },
};

// Aborts after the first text-delta chunk, reports (with the stream's id, for the test to clean up),
// then stays alive until stdin closes.
async function abortAfterFirstText(Transport, body) {
  let streamId = null;
  const recording = async (input, init) => {
    const response = await fetch(input, init);
    streamId ??= response.headers.get("x-stream-id");
    return response;
  };
  const chosen = new Transport({ api: baseURL + "/api/chat", body, fetch: recording });
  const controller = new AbortController();
  const stream = await chosen.sendMessages({
    chatId: "chat-1", messages: [question], trigger: "submit-message", messageId: undefined,
    abortSignal: controller.signal,
  });
  let delta = null;
  let error = null;
  try {
    for await (const chunk of stream) {
      if (!controller.signal.aborted && chunk.type === "text-delta") {
        delta = chunk.delta;
        controller.abort();
      }
    }
  } catch (caught) {
    error = caught.name;
  }
  process.stdout.write(JSON.stringify({ delta, error, aborted: controller.signal.aborted, streamId }) + "\n");
  process.stdin.resume();
  await once(process.stdin, "end");
  return null;
}

if (!(name in cases)) throw new Error(`unknown case ${name}: one of ${Object.keys(cases).join(", ")}`);
const result = await cases[name]();
if (result !== null) process.stdout.write(JSON.stringify(result) + "\n");
