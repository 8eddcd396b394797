// tokenwire browser client: POST a generation, read its Server-Sent Events over fetch.
//
//   import { streamTokens, MessageAccumulator, parseSSE, SSEParser, TokenwireError } from "/tokenwire.js";
//   const answer = new MessageAccumulator();
//   for await (const ev of streamTokens("/api/stream", { body, headers, signal, resume: true })) {
//     answer.add(ev); ...
//   }
//   messages.push(answer.toMessage()); // then one {role: "tool"} message per answer.toolCalls entry
//
// The SSE parser follows the HTML standard, "9.2.6 Interpreting an event stream", exactly like
// src/tokenwire/_sse.py; both are tested against tests/fixtures/sse/cases.json. One deliberate
// addition, shared with the Python decoder: every event carries `retry`, the reconnection time of
// the last valid `retry` field seen so far (null if none), because a `retry` field alone in a block
// dispatches nothing and a fetch-based client still needs it.
//
// An ES module with no build step and no dependencies; types are JSDoc.

/**
 * One dispatched Server-Sent Event.
 * @typedef {object} ServerSentEvent
 * @property {string} event  the event type, "message" unless an `event` field said otherwise
 * @property {string} data   the data lines joined with "\n"
 * @property {string} id     the last event ID at dispatch time ("" if none); it persists across events
 * @property {number|null} retry  the last valid `retry` value seen so far, or null
 */

/**
 * One event of a tokenwire stream (docs/protocol.md, "Events").
 * Types this client does not know are yielded too, as they came ("Clients should ignore event
 * types and fields they do not know").
 * @typedef {{type: "start", stream_id: string, model: string}
 *   | {type: "queued", position: number}
 *   | {type: "token", text: string}
 *   | {type: "reasoning", text: string}
 *   | {type: "reasoning_signature", signature: string}
 *   | {type: "redacted_reasoning", data: string}
 *   | {type: "refusal", text: string}
 *   | {type: "tool_call_start", index: number, id: string, name: string}
 *   | {type: "tool_call_delta", index: number, arguments: string}
 *   | {type: "tool_call_end", index: number, id: string, name: string, arguments: string}
 *   | {type: "done", finish_reason: FinishReason, upstream_finish_reason?: string,
 *      usage: {prompt_tokens: number|null, completion_tokens: number}}
 *   | {type: "error", error: {type: string, message: string, retryable: boolean}}} StreamEvent
 */

/**
 * Why a stream ended (docs/protocol.md, "The end"); `other` comes with `upstream_finish_reason`.
 * @typedef {"stop"|"length"|"tool_calls"|"content_filter"|"other"|"cancelled"|"timeout"} FinishReason
 */

const LF = 10;
const CR = 13;
const COLON = 58;
const SPACE = 32;
const BOM = 0xfeff;
const DIGITS = /^[0-9]+$/;

/**
 * Incremental, synchronous SSE parser over text: `feed()` chunks of any size, get the events they
 * complete. Lines end at CRLF, LF or CR (a CR ending one chunk and an LF starting the next are one
 * line end); U+2028 and U+0085 are not line ends. One leading U+FEFF is stripped, so feed it text
 * decoded with the BOM kept (`new TextDecoder("utf-8", {ignoreBOM: true})`).
 */
export class SSEParser {
  /** @type {string[]} pieces of the current, unterminated line */
  #partial = [];
  #atStart = true;
  #skipLF = false;
  /** the data buffer; null until a data field arrives (a string, not an array: cheaper per event) */
  /** @type {string|null} */
  #data = null;
  #event = "";
  #lastEventId = "";
  /** @type {number|null} */
  #retry = null;
  /** @type {((ms: number) => void) | undefined} */
  #onRetry;

  /**
   * @param {{onRetry?: (ms: number) => void}} [options]
   *   onRetry: called with the new reconnection time whenever a valid `retry` field is read.
   */
  constructor({ onRetry } = {}) {
    this.#onRetry = onRetry;
  }

  /** The last event ID buffer ("" if none). @returns {string} */
  get lastEventId() {
    return this.#lastEventId;
  }

  /** The last valid `retry` value, or null. @returns {number|null} */
  get retry() {
    return this.#retry;
  }

  /**
   * Parses the next piece of the stream.
   * @param {string} text
   * @returns {ServerSentEvent[]} the events this text completed
   */
  feed(text) {
    /** @type {ServerSentEvent[]} */
    const events = [];
    if (!text) return events;
    const n = text.length;
    let pos = 0;
    if (this.#atStart) {
      this.#atStart = false;
      // "One leading U+FEFF BYTE ORDER MARK character must be ignored if any are present."
      if (text.charCodeAt(0) === BOM) pos = 1;
    }
    // The first CR and the first LF of the text (-1: none), if searched for the line below.
    let cr = -2;
    let lf = -2;
    if (this.#partial.length) {
      // A line begun in an earlier chunk (so pos is 0): parse it whole once its CR or LF arrives.
      cr = text.indexOf("\r");
      lf = text.indexOf("\n");
      const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
      if (end === -1) {
        this.#partial.push(text);
        return events;
      }
      this.#partial.push(text.slice(0, end + 1));
      const line = this.#partial.join("");
      this.#partial = [];
      // The line's CR or LF is its last character, its only one.
      const last = line.length - 1;
      this.#lines(line, 0, end === cr ? last : -1, end === cr ? -1 : last, events);
      pos = end + 1;
    }
    if (this.#skipLF && pos < n) {
      this.#skipLF = false;
      if (text.charCodeAt(pos) === LF) pos += 1;
    }
    pos = this.#lines(text, pos, cr, lf, events);
    if (pos < n) this.#partial.push(text.slice(pos));
    return events;
  }

  /**
   * Ends the stream: "any pending data must be discarded" (an unterminated last event is not
   * dispatched). The last event ID and retry persist.
   * @returns {ServerSentEvent[]} always empty; returned for symmetry with feed()
   */
  end() {
    this.#partial = [];
    this.#skipLF = false;
    this.#data = null;
    this.#event = "";
    return [];
  }

  /**
   * Parses the lines of text from pos up to its last CR or LF, in place: only field values are
   * sliced out of the text, not lines.
   * @param {string} text
   * @param {number} pos
   * @param {number} cr  the next CR at or after pos (-1: none), or any index below pos if not known
   * @param {number} lf  the next LF, likewise
   * @param {ServerSentEvent[]} events
   * @returns {number} where the unterminated rest of the text starts (text.length if none)
   */
  #lines(text, pos, cr, lf, events) {
    const n = text.length;
    while (pos < n) {
      const first = text.charCodeAt(pos);
      let end = pos;
      let isCR = first === CR;
      if (isCR || first === LF) {
        // A blank line.
        this.#dispatch(events);
      } else if (first === 105 /* i */ && (end = idLineEnd(text, pos)) !== -1) {
        // "id:" and a value without U+0000: it sets the last event ID (see #field), less a leading
        // space.
        isCR = text.charCodeAt(end) === CR;
        this.#lastEventId = text.slice(text.charCodeAt(pos + 3) === SPACE ? pos + 4 : pos + 3, end);
      } else {
        // The next CR and the next LF are searched again only once passed, so the text is scanned
        // once whatever the mix of line endings.
        if (cr !== -1 && cr < pos) cr = text.indexOf("\r", pos);
        if (lf !== -1 && lf < pos) lf = text.indexOf("\n", pos);
        end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
        if (end === -1) return pos;
        isCR = end === cr;
        this.#field(text, pos, end, first);
      }
      // "end-of-line = ( cr lf / cr / lf )"; the LF after a CR that ends the text is in the next one.
      pos = end + 1;
      if (isCR) {
        if (pos === n) this.#skipLF = true;
        else if (text.charCodeAt(pos) === LF) pos += 1;
      }
    }
    return n;
  }

  /**
   * Processes the line text[start:end], not blank, whose first character is `first`. text[end] is
   * its CR or LF, so reading the line never runs past the text.
   * @param {string} text
   * @param {number} start
   * @param {number} end
   * @param {number} first
   */
  #field(text, start, end, first) {
    // The field name is what precedes the first colon (the whole line if there is none), and only
    // four names mean anything, so a line is matched against them from its first character on.
    let from;
    switch (first) {
      case 100: // d
        // "ata" matched by hand, not by valueStart()'s loop: this is the line of nearly every event.
        from =
          text.charCodeAt(start + 1) === 97 && text.charCodeAt(start + 2) === 116 && text.charCodeAt(start + 3) === 97
            ? valueAfter(text, start + 4, end)
            : -1;
        if (from !== -1) {
          const value = text.slice(from, end);
          this.#data = this.#data === null ? value : `${this.#data}\n${value}`;
        }
        break;
      case 105: // i
        from = valueStart(text, start, end, "id");
        if (from !== -1) {
          const value = text.slice(from, end);
          // "If the field value does not contain U+0000 NULL, then set the last event ID buffer"
          if (!value.includes("\0")) this.#lastEventId = value;
        }
        break;
      case 101: // e
        from = valueStart(text, start, end, "event");
        if (from !== -1) this.#event = text.slice(from, end);
        break;
      case 114: // r
        from = valueStart(text, start, end, "retry");
        if (from !== -1) {
          const value = text.slice(from, end);
          // "If the field value consists of only ASCII digits ... Otherwise, ignore the field."
          if (DIGITS.test(value)) {
            this.#retry = parseInt(value, 10);
            this.#onRetry?.(this.#retry);
          }
        }
        break;
      default:
      // "If the line starts with a U+003A COLON character (:) Ignore the line." "Otherwise: The
      // field is ignored."
    }
  }

  /** @param {ServerSentEvent[]} events */
  #dispatch(events) {
    // "If the data buffer is an empty string, set the data buffer and the event type buffer to
    // the empty string and return." (A `data` field with an empty value still dispatches "".)
    if (this.#data === null) {
      this.#event = "";
      return;
    }
    events.push({
      event: this.#event || "message",
      data: this.#data,
      id: this.#lastEventId,
      retry: this.#retry,
    });
    this.#data = null;
    this.#event = "";
  }
}

/**
 * Where the value of the line text[start:end] (text[end] being its CR or LF) starts if the line's
 * field name is `name`, else -1. The caller has matched the name's first character.
 * @param {string} text
 * @param {number} start
 * @param {number} end
 * @param {string} name
 * @returns {number}
 */
function valueStart(text, start, end, name) {
  for (let i = 1; i < name.length; i++) if (text.charCodeAt(start + i) !== name.charCodeAt(i)) return -1;
  return valueAfter(text, start + name.length, end);
}

/**
 * Where the value of the line text[:end] (text[end] being its CR or LF) starts if its field name
 * ends at `after`, else -1.
 * @param {string} text
 * @param {number} after
 * @param {number} end
 * @returns {number}
 */
function valueAfter(text, after, end) {
  // "If the line contains no U+003A COLON character: ... the field value [is] the empty string."
  if (after === end) return end;
  if (text.charCodeAt(after) !== COLON) return -1; // a longer name
  // "If value starts with a U+0020 SPACE character, remove it from value."
  return text.charCodeAt(after + 1) === SPACE ? after + 2 : after + 1;
}

/**
 * The end (its CR or LF) of the line at text[start] if it is an `id` field with a colon, a value
 * without U+0000 and its line end in the text; else -1. Ids are short and their value must be
 * read whole anyway, so reading the line through is cheaper than searching for its end.
 * @param {string} text
 * @param {number} start
 * @returns {number}
 */
function idLineEnd(text, start) {
  if (start + 2 >= text.length || text.charCodeAt(start + 1) !== 100 || text.charCodeAt(start + 2) !== COLON) return -1;
  for (let i = start + 3; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c <= CR) {
      if (c === LF || c === CR) return i;
      if (c === 0) return -1;
    }
  }
  return -1;
}

/**
 * Reads Server-Sent Events from a byte stream such as a fetch `response.body`.
 *
 * Decodes UTF-8 incrementally (a character split across chunks waits for its end, invalid bytes
 * become U+FFFD). Ending the iteration early (break, return, an exception in the loop body)
 * cancels the stream, which closes the connection.
 *
 * @param {ReadableStream<Uint8Array>} body
 * @param {{onRetry?: (ms: number) => void}} [options]
 * @returns {AsyncGenerator<ServerSentEvent, void, undefined>}
 */
export async function* parseSSE(body, { onRetry } = {}) {
  const reader = body.getReader();
  // ignoreBOM keeps a leading BOM in the text so that SSEParser strips exactly one, as the
  // spec says, in one place for both entry points.
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  const parser = new SSEParser({ onRetry });
  let finished = false;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        finished = true;
        yield* parser.feed(decoder.decode());
        parser.end();
        return;
      }
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
  } finally {
    if (!finished) {
      // Not awaited: a stream that is already errored (an abort) rejects, and an early exit must
      // not wait for the peer.
      reader.cancel().catch(() => {});
    }
    try {
      reader.releaseLock();
    } catch {
      // already released
    }
  }
}

/**
 * What went wrong with a stream, before or while it ran.
 *
 * `type` is the server's `error.type` for a JSON error answer (`invalid_request`, `unauthorized`,
 * `rate_limited`, ...), or one of the client's own: `http_error` (a non-2xx answer without a JSON
 * error), `unexpected_content_type`, `network_error` (the request failed), `stream_cut` (the
 * stream ended without its `done` or `error` event), `invalid_event` (data that is not JSON).
 * An `error` *event* in the stream is not thrown: it is yielded as the stream's last event.
 */
export class TokenwireError extends Error {
  /**
   * @param {string} message
   * @param {{type: string, status?: number, error?: {type?: string, message?: string, param?: string},
   *          retryAfter?: number, cause?: unknown}} details
   */
  constructor(message, { type, status, error, retryAfter, cause }) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "TokenwireError";
    /** @type {string} */
    this.type = type;
    /** @type {number|undefined} the HTTP status, when there was an answer */
    this.status = status;
    /** @type {{type?: string, message?: string, param?: string}|undefined} the server's JSON `error` */
    this.error = error;
    /** @type {number|undefined} seconds, from a `Retry-After` header */
    this.retryAfter = retryAfter;
  }
}

const TERMINAL_TYPES = new Set(["done", "error"]);
const MAX_RESUME_ATTEMPTS = 5;
const DEFAULT_RETRY_MS = 1000;

/** @type {typeof fetch} */
const defaultFetch = (input, init) => globalThis.fetch(input, init);

/**
 * @typedef {object} StreamOptions
 * @property {unknown} [body]  the request, sent as JSON (docs/protocol.md, "Starting a stream")
 * @property {HeadersInit} [headers]  extra headers, e.g. `{authorization: "Bearer ..."}`
 * @property {AbortSignal} [signal]  aborting ends the iteration cleanly (no exception)
 * @property {typeof fetch} [fetch]  a fetch implementation (default: the global one)
 * @property {boolean} [resume]  reconnect after a network error or a cut stream with GET
 *   `${url}/${stream_id}` and `Last-Event-ID` (never a second POST), and DELETE the stream when
 *   the caller aborts or stops early. Start the stream with `body.resumable: true` so that the
 *   server keeps generating while the client is away.
 */

/**
 * Starts a generation and yields its events (`start`, `queued`, the output events, and last
 * `done` or `error`) as they arrive, every type as it is: feed them to a
 * {@link MessageAccumulator} to assemble the answer.
 *
 * Throws a {@link TokenwireError} on a non-2xx answer, a wrong content type, or a stream that ends
 * without its `done` / `error` event (`type: "stream_cut"`, after the reconnection attempts when
 * `resume` is set). Ends without an exception when `signal` aborts.
 *
 * @param {string} url  the stream endpoint, e.g. "/api/stream"
 * @param {StreamOptions} [options]
 * @returns {AsyncGenerator<StreamEvent, void, undefined>}
 */
export async function* streamTokens(url, options = {}) {
  const { body, headers, signal, fetch: fetchImpl = defaultFetch, resume = false } = options;
  const state = {
    /** @type {string|null} */ streamId: null,
    lastSeq: 0,
    /** @type {number|null} */ retryMs: null,
    finished: false,
  };
  const onRetry = (/** @type {number} */ ms) => {
    state.retryMs = ms;
  };
  const base = String(url).replace(/\/+$/, "");

  try {
    if (signal?.aborted) return;
    const postHeaders = new Headers(headers);
    postHeaders.set("content-type", "application/json");
    postHeaders.set("accept", "text/event-stream");
    // With resume, a POST cut before its answer can be sent again: the key makes the server
    // attach it to the generation it already started instead of starting a second one.
    if (resume && !postHeaders.has("idempotency-key")) postHeaders.set("idempotency-key", randomKey());
    let response;
    for (let attempt = 0; ; attempt++) {
      try {
        response = await fetchImpl(url, {
          method: "POST",
          headers: postHeaders,
          body: JSON.stringify(body ?? {}),
          signal,
        });
        break;
      } catch (err) {
        if (signal?.aborted) return;
        if (!resume || attempt >= MAX_RESUME_ATTEMPTS) {
          throw new TokenwireError(`request failed: ${errorMessage(err)}`, { type: "network_error", cause: err });
        }
        if (!(await sleep(DEFAULT_RETRY_MS * 2 ** attempt, signal))) return;
      }
    }
    if (!(await checkResponse(response, signal))) return;
    let resumeAttempts = 0;

    for (;;) {
      state.streamId ??= response.headers.get("x-stream-id");
      /** @type {TokenwireError} */
      let cut;
      try {
        for await (const sse of parseSSE(/** @type {ReadableStream<Uint8Array>} */ (response.body), { onRetry })) {
          // Ids are sequence numbers: after a reconnect, skip anything already seen. A reader's
          // own terminal error (its cursor was trimmed, the store stayed down) is not in the
          // log: it carries the id of the last event sent, and always goes through.
          const seq = /^[0-9]+$/.test(sse.id) ? Number(sse.id) : null;
          const event = parseEvent(sse.data);
          if (seq !== null) {
            if (seq < state.lastSeq || (seq === state.lastSeq && event.type !== "error")) continue;
            state.lastSeq = seq;
          }
          if (event.type === "start" && typeof event.stream_id === "string") state.streamId = event.stream_id;
          if (TERMINAL_TYPES.has(event.type)) state.finished = true;
          resumeAttempts = 0;
          yield /** @type {StreamEvent} */ (event);
          if (state.finished || signal?.aborted) return;
        }
        cut = new TokenwireError("the stream ended without a done or error event", { type: "stream_cut" });
      } catch (err) {
        if (signal?.aborted) return;
        if (err instanceof TokenwireError) throw err;
        cut = new TokenwireError(`the stream was cut: ${errorMessage(err)}`, { type: "stream_cut", cause: err });
      }
      if (!resume || !state.streamId) throw cut;

      // Extension point: reconnection. GET the stream's log after the last event seen.
      let delay = state.retryMs ?? DEFAULT_RETRY_MS;
      let next = null;
      while (next === null) {
        if (resumeAttempts >= MAX_RESUME_ATTEMPTS) throw cut;
        resumeAttempts += 1;
        if (!(await sleep(delay, signal))) return;
        delay *= 2;
        const getHeaders = new Headers(headers);
        getHeaders.set("accept", "text/event-stream");
        if (state.lastSeq > 0) getHeaders.set("last-event-id", String(state.lastSeq));
        let answer;
        try {
          answer = await fetchImpl(`${base}/${encodeURIComponent(state.streamId)}`, {
            method: "GET",
            headers: getHeaders,
            signal,
          });
        } catch (err) {
          if (signal?.aborted) return;
          cut = new TokenwireError(`reconnecting failed: ${errorMessage(err)}`, { type: "stream_cut", cause: err });
          continue;
        }
        if (answer.status === 429 || answer.status >= 500) {
          answer.body?.cancel().catch(() => {});
          cut = new TokenwireError(`reconnecting failed: HTTP ${answer.status}`, { type: "stream_cut", status: answer.status });
          continue;
        }
        if (!(await checkResponse(answer, signal))) return;
        next = answer;
      }
      response = next;
    }
  } finally {
    // With resume the server keeps generating for a while after a disconnect: tell it to stop
    // when the caller aborted, broke out of the loop, or the stream failed for good.
    if (resume && state.streamId && !state.finished) {
      fetchImpl(`${base}/${encodeURIComponent(state.streamId)}`, {
        method: "DELETE",
        keepalive: true,
        headers: new Headers(headers),
      }).then(
        (answer) => answer.body?.cancel().catch(() => {}),
        () => {},
      );
    }
  }
}

/**
 * Throws for a non-2xx answer or a wrong content type; returns false when the signal aborted
 * while the error body was read.
 * @param {Response} response
 * @param {AbortSignal|undefined} signal
 * @returns {Promise<boolean>}
 */
async function checkResponse(response, signal) {
  if (!response.ok) {
    let text = "";
    try {
      text = await response.text();
    } catch {
      if (signal?.aborted) return false;
    }
    /** @type {any} */
    let error;
    try {
      const parsed = JSON.parse(text);
      if (parsed && typeof parsed.error === "object" && parsed.error !== null) error = parsed.error;
    } catch {
      // not JSON: keep the text for the message
    }
    const retryAfterHeader = response.headers.get("retry-after");
    const retryAfter = retryAfterHeader && /^[0-9]+$/.test(retryAfterHeader) ? Number(retryAfterHeader) : undefined;
    const detail = error?.message ?? (text.slice(0, 200) || response.statusText);
    throw new TokenwireError(`HTTP ${response.status}: ${detail}`, {
      type: typeof error?.type === "string" ? error.type : "http_error",
      status: response.status,
      error,
      retryAfter,
    });
  }
  const contentType = response.headers.get("content-type") ?? "";
  if (contentType.split(";")[0].trim().toLowerCase() !== "text/event-stream" || !response.body) {
    response.body?.cancel().catch(() => {});
    throw new TokenwireError(`expected text/event-stream, got ${contentType || "no content type"}`, {
      type: "unexpected_content_type",
      status: response.status,
    });
  }
  return true;
}

/**
 * @param {string} data
 * @returns {{type: string, [key: string]: any}}
 */
function parseEvent(data) {
  let event;
  try {
    event = JSON.parse(data);
  } catch (err) {
    throw new TokenwireError(`an event is not JSON: ${data.slice(0, 100)}`, { type: "invalid_event", cause: err });
  }
  if (!event || typeof event !== "object" || typeof event.type !== "string") {
    throw new TokenwireError(`an event has no type: ${data.slice(0, 100)}`, { type: "invalid_event" });
  }
  return event;
}

/**
 * Waits `ms`; resolves false at once if the signal aborts.
 * @param {number} ms
 * @param {AbortSignal|undefined} signal
 * @returns {Promise<boolean>}
 */
function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal?.aborted) return resolve(false);
    const onAbort = () => {
      clearTimeout(timer);
      resolve(false);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve(true);
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** A random Idempotency-Key (crypto.randomUUID needs a secure context; localhost is one). */
function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
}

/** @param {unknown} err */
function errorMessage(err) {
  return err instanceof Error ? err.message : String(err);
}

/**
 * One tool call of an answer, as far as it has streamed.
 * @typedef {object} ToolCall
 * @property {number} index  the call's place among the answer's calls, from 0 in the order they started
 * @property {string} id
 * @property {string} name
 * @property {string} arguments  the JSON text so far; once `done`, the whole of it, as the model wrote it
 * @property {Record<string, unknown>|undefined} input  the parsed arguments, once `done` and if they are
 *   a JSON object (what every tool takes); otherwise undefined
 * @property {string|undefined} error  why a `done` call has no `input`: the arguments are not JSON, or
 *   not an object
 * @property {boolean} done  its `tool_call_end` has arrived
 */

/**
 * A block of reasoning, as the assistant message sends it back (docs/protocol.md, "Reasoning").
 * @typedef {{type: "reasoning", text: string, signature?: string}
 *   | {type: "redacted_reasoning", data: string}} ReasoningBlock
 */

/**
 * An assistant turn in the request's shape (docs/protocol.md, "Messages").
 * @typedef {object} AssistantMessage
 * @property {"assistant"} role
 * @property {string|null} content  null only when the turn is tool calls and no text
 * @property {{id: string, type: "function", function: {name: string, arguments: string}}[]} [tool_calls]
 * @property {ReasoningBlock[]} [reasoning]
 */

/**
 * Assembles one answer from its stream's events: the text, the reasoning blocks, the refusal, the
 * tool calls (arguments growing as their fragments arrive, interleaved or not), and how it ended.
 * `toMessage()` gives the assistant message to send back with the tool results.
 *
 * Feed it every event of one stream, in order; events it has no use for (`start`, `queued`, types
 * it does not know) are ignored. The getters give copies (shallow: a call's parsed `input` is shared),
 * to read as often as the page repaints.
 */
export class MessageAccumulator {
  #text = "";
  #refusal = "";
  /** @type {ReasoningBlock[]} the blocks a signature or a redaction closed */
  #blocks = [];
  /** @type {string|null} reasoning text since the last closed block; null: none */
  #openReasoning = null;
  /** @type {Map<number, ToolCall>} */
  #calls = new Map();
  /** @type {FinishReason|null} */
  #finishReason = null;
  /** @type {string|null} */
  #upstreamFinishReason = null;
  /** @type {{prompt_tokens: number|null, completion_tokens: number}|null} */
  #usage = null;
  /** @type {{type: string, message: string, retryable: boolean}|null} */
  #error = null;

  /**
   * Takes the stream's next event.
   * @param {StreamEvent | {type: string, [key: string]: any}} event
   */
  add(event) {
    const e = /** @type {any} */ (event);
    switch (e.type) {
      case "token":
        this.#text += e.text;
        break;
      case "reasoning":
        this.#openReasoning = (this.#openReasoning ?? "") + e.text;
        break;
      case "reasoning_signature":
        // "the reasoning texts since the stream's start or the last reasoning_signature /
        // redacted_reasoning form one block, signed with this"
        this.#blocks.push({ type: "reasoning", text: this.#openReasoning ?? "", signature: e.signature });
        this.#openReasoning = null;
        break;
      case "redacted_reasoning":
        this.#closeReasoning();
        this.#blocks.push({ type: "redacted_reasoning", data: e.data });
        break;
      case "refusal":
        this.#refusal += e.text;
        break;
      case "tool_call_start": {
        const call = this.#call(e.index);
        call.id = e.id;
        call.name = e.name;
        break;
      }
      case "tool_call_delta":
        this.#call(e.index).arguments += e.arguments;
        break;
      case "tool_call_end": {
        const call = this.#call(e.index);
        call.id = e.id;
        call.name = e.name;
        // The whole string is authoritative: it is what the model sent, and what goes back.
        call.arguments = e.arguments;
        call.done = true;
        parseArguments(call);
        break;
      }
      case "done":
        this.#finishReason = e.finish_reason;
        this.#upstreamFinishReason = e.upstream_finish_reason ?? null;
        this.#usage = e.usage ?? null;
        break;
      case "error":
        this.#error = e.error;
        break;
      default:
      // start, queued, and types this client does not know
    }
  }

  /** The answer's text so far. @returns {string} */
  get text() {
    return this.#text;
  }

  /**
   * The reasoning so far, block by block; the text after the last signature (if any) is a last
   * block without one.
   * @returns {ReasoningBlock[]}
   */
  get reasoning() {
    const blocks = this.#blocks.map((block) => ({ ...block }));
    if (this.#openReasoning !== null) blocks.push({ type: "reasoning", text: this.#openReasoning });
    return blocks;
  }

  /** The refusal's text so far ("" if the model did not refuse). @returns {string} */
  get refusal() {
    return this.#refusal;
  }

  /** The tool calls so far, by index. @returns {ToolCall[]} */
  get toolCalls() {
    return [...this.#calls.values()].sort((a, b) => a.index - b.index).map((call) => ({ ...call }));
  }

  /** `done`'s finish_reason; null until it arrives. @returns {FinishReason|null} */
  get finishReason() {
    return this.#finishReason;
  }

  /** `done`'s upstream_finish_reason (set with finish_reason "other"), else null. @returns {string|null} */
  get upstreamFinishReason() {
    return this.#upstreamFinishReason;
  }

  /** `done`'s usage; null until it arrives. @returns {{prompt_tokens: number|null, completion_tokens: number}|null} */
  get usage() {
    return this.#usage;
  }

  /** The `error` event's error, if the stream failed; else null. @returns {{type: string, message: string, retryable: boolean}|null} */
  get error() {
    return this.#error;
  }

  /**
   * The assistant message to append to `messages` before the tool results: its text (null when
   * there is none and there are calls), the calls that ended (one still streaming when the stream
   * stopped cannot be run, so it is left out), and the reasoning blocks, which a provider that signs
   * them needs back unchanged.
   * @returns {AssistantMessage}
   */
  toMessage() {
    const calls = this.toolCalls.filter((call) => call.done);
    /** @type {AssistantMessage} */
    const message = { role: "assistant", content: this.#text || (calls.length ? null : "") };
    if (calls.length) {
      message.tool_calls = calls.map((call) => ({
        id: call.id,
        type: "function",
        function: { name: call.name, arguments: call.arguments },
      }));
    }
    const reasoning = this.reasoning;
    if (reasoning.length) message.reasoning = reasoning;
    return message;
  }

  #closeReasoning() {
    if (this.#openReasoning === null) return;
    this.#blocks.push({ type: "reasoning", text: this.#openReasoning });
    this.#openReasoning = null;
  }

  /**
   * The call at `index`, created if its start has not arrived (the server always sends it first).
   * @param {number} index
   * @returns {ToolCall}
   */
  #call(index) {
    let call = this.#calls.get(index);
    if (call === undefined) {
      call = { index, id: "", name: "", arguments: "", input: undefined, error: undefined, done: false };
      this.#calls.set(index, call);
    }
    return call;
  }
}

/**
 * Sets a finished call's `input`, or its `error`.
 * @param {ToolCall} call
 */
function parseArguments(call) {
  call.input = undefined;
  call.error = undefined;
  let value;
  try {
    value = JSON.parse(call.arguments);
  } catch (err) {
    call.error = `the arguments are not valid JSON: ${errorMessage(err)}`;
    return;
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    // Worded as the Python client words it.
    const kind = value === null ? "null" : Array.isArray(value) ? "array" : typeof value;
    call.error = `the arguments are a JSON ${kind}, not an object`;
    return;
  }
  call.input = value;
}

/**
 * The AI SDK's `DefaultChatTransport`, with a Stop that stops the model even on a resumable chat.
 *
 * `useChat`'s `stop()` aborts the fetch. On a chat sent with `resumable: true` the server keeps
 * generating after that (it cannot tell a Stop from a dropped connection, which resume is for), so
 * this transport also sends `DELETE /api/stream/{id}` for the stream the aborted request was
 * reading (the `X-Stream-Id` of its answer, on the POST and on a resume alike), with the request's
 * own headers. Pass the `ai` package's class, which your bundler provides; tokenwire.js itself
 * imports nothing:
 *
 *   import { DefaultChatTransport } from "ai";
 *   import { tokenwireChatTransport } from "./tokenwire.js";
 *   const TokenwireChatTransport = tokenwireChatTransport(DefaultChatTransport);
 *   useChat({ transport: new TokenwireChatTransport({ api: "/api/chat", body: { resumable: true } }), resume: true });
 *
 * `streamsUrl` (default: `api` with its last `/chat` replaced by `/stream`) is where the DELETE goes.
 *
 * @template {new (options?: any) => any} T
 * @param {T} DefaultChatTransport  the `ai` package's class
 * @returns {T}
 */
export function tokenwireChatTransport(DefaultChatTransport) {
  return class TokenwireChatTransport extends DefaultChatTransport {
    /** @param {Record<string, any>} [options]  DefaultChatTransport's options, plus `streamsUrl` */
    constructor(options = {}) {
      const api = options.api ?? "/api/chat";
      const streamsUrl = options.streamsUrl ?? api.replace(/\/chat(?=[^/]*$)/, "/stream");
      const innerFetch = options.fetch ?? defaultFetch;
      /** @type {typeof fetch} */
      const stoppingFetch = async (input, init = {}) => {
        const response = await innerFetch(input, init);
        const streamId = response.headers.get("x-stream-id");
        const signal = init.signal;
        if (streamId && signal && !signal.aborted) {
          const cancel = () => {
            innerFetch(`${streamsUrl}/${encodeURIComponent(streamId)}`, {
              method: "DELETE",
              headers: init.headers,
              credentials: init.credentials,
            }).catch(() => {}); // the server ends an abandoned stream after its grace period anyway
          };
          signal.addEventListener("abort", cancel, { once: true });
        }
        return response;
      };
      const { streamsUrl: _unused, ...rest } = options;
      super({ ...rest, api, fetch: stoppingFetch });
    }
  };
}
