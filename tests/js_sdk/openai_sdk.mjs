// The official `openai` npm package against tokenwire's /v1/chat/completions.
//
//   node tests/js_sdk/openai_sdk.mjs <base_url>/v1 <case>
//
// Prints one JSON line with what the SDK made of the answer; tests/test_openai_node.py asserts on it.
// Kept out of tests/js/, which `node --test` runs without a server.
//
// `openai` is installed in bench/node_modules (`npm ci --prefix bench`), which node's resolution from
// this file would not search (ES modules ignore NODE_PATH), so it is required from bench/package.json.
import { createRequire } from "node:module";
import { once } from "node:events";

const require = createRequire(new URL("../../bench/package.json", import.meta.url));
const { OpenAI } = require("openai");

const [baseURL, name] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 10_000 });
const hi = [{ role: "user", content: "hi" }];
// The same tools as tests/test_openai_api.py; the Python side checks the upstream got them unchanged.
const TOOLS = [
  { type: "function", function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } } },
  { type: "function", function: { name: "get_time", parameters: { type: "object", properties: { tz: { type: "string" } } } } },
];

const cases = {
  async text() {
    const stream = await client.chat.completions.create({
      model: "served-model", messages: hi, stream: true, stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    return { chunks };
  },

  async tools() {
    const stream = client.chat.completions.stream({
      model: "served-model", messages: [{ role: "user", content: "Weather and time?" }], tools: TOOLS,
    });
    return { completion: await stream.finalChatCompletion() };
  },

  async whole() {
    const completion = await client.chat.completions.create({
      model: "served-model", messages: [{ role: "user", content: "Weather?" }], tools: TOOLS.slice(0, 1),
      max_completion_tokens: 50, reasoning_effort: "low",
    });
    return { completion };
  },

  // Aborts after the first content chunk, reports, then stays alive until stdin closes: the test
  // checks the upstream's socket while this process (and so its sockets) still exists, so only
  // the abort itself can have closed it.
  async abort() {
    const controller = new AbortController();
    const stream = await client.chat.completions.create(
      { model: "served-model", messages: hi, stream: true },
      { signal: controller.signal },
    );
    let content = null;
    let error = null;  // the SDK ends an aborted stream's iteration quietly, without throwing
    try {
      for await (const chunk of stream) {
        if (!controller.signal.aborted && chunk.choices[0]?.delta?.content) {
          content = chunk.choices[0].delta.content;
          controller.abort();
        }
      }
    } catch (caught) {
      error = caught.constructor.name;
    }
    process.stdout.write(JSON.stringify({ content, error, aborted: controller.signal.aborted }) + "\n");
    process.stdin.resume();
    await once(process.stdin, "end");
    return null;
  },

  // Each way a request can fail, as the SDK raises it (see failure()).
  async refused() {
    return failure(() => client.chat.completions.create({ model: "served-model", messages: hi, n: 2 }), OpenAI.BadRequestError);
  },

  async midstream() {  // the upstream fails after the answer started: the stream's error chunk
    return failure(async () => {
      const stream = await client.chat.completions.create({ model: "served-model", messages: hi, stream: true });
      for await (const chunk of stream) void chunk;
    }, OpenAI.APIError);
  },

  async failed() {  // the same, for a whole answer: a 502
    return failure(() => client.chat.completions.create({ model: "served-model", messages: hi }), OpenAI.InternalServerError);
  },

  async unauthorized() {  // a server with keys, and a wrong one
    return failure(() => client.chat.completions.create({ model: "scripted", messages: hi, stream: true }), OpenAI.AuthenticationError);
  },
};

// What `request` threw: its class's name, whether it is an `expected` (the SDK's own class for that
// failure), its status and message.
async function failure(request, expected) {
  try {
    await request();
  } catch (caught) {
    return { name: caught.constructor.name, expected: caught instanceof expected, status: caught.status ?? null, message: caught.message };
  }
  return { name: null };
}

if (!(name in cases)) throw new Error(`unknown case ${name}: one of ${Object.keys(cases).join(", ")}`);
const result = await cases[name]();
if (result !== null) process.stdout.write(JSON.stringify(result) + "\n");
