// A minimal useChat page on tokenwire: the AI SDK's own hook, with only its `api` pointed at tokenwire.
import { useState } from "react";
import { createRoot } from "react-dom/client";
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport, generateId } from "ai";
import { tokenwireChatTransport } from "../../../src/tokenwire/static/tokenwire.js";

// TOKENWIRE_URL is set by build.mjs: "" (this page's own origin) unless the build was given one.
const API = `${TOKENWIRE_URL}/api/chat`;

// `?resumable` in the URL turns on resumable chats: the server keeps generating through a reload,
// and the page picks the answer up again on mount. That needs the same chat id after a reload, so
// it lives in the URL's hash. tokenwire's transport also DELETEs the stream on Stop, which would
// otherwise keep generating for the server's resume grace period.
const resumable = new URLSearchParams(location.search).has("resumable");
if (!location.hash) history.replaceState(null, "", "#" + generateId());
const chatId = location.hash.slice(1);

const TokenwireChatTransport = tokenwireChatTransport(DefaultChatTransport);
const transport = resumable
  ? new TokenwireChatTransport({ api: API, body: { resumable: true } })
  : new DefaultChatTransport({ api: API });

function Part({ part }) {
  if (part.type === "text") return <span className="text">{part.text}</span>;
  if (part.type === "reasoning") return <div className="reasoning">{part.text}</div>;
  if (part.type.startsWith("tool-")) {
    return (
      <div className="tool" data-state={part.state}>
        {part.type.slice(5)}({JSON.stringify(part.input ?? null)})
      </div>
    );
  }
  return null;
}

function App() {
  const { messages, sendMessage, stop, status, error } = useChat({ id: chatId, transport, resume: resumable });
  const [input, setInput] = useState("");
  const busy = status === "submitted" || status === "streaming";
  const send = (event) => {
    event.preventDefault();
    if (!input.trim() || busy) return;
    sendMessage({ text: input });
    setInput("");
  };
  return (
    <main data-status={status}>
      {messages.map((message) => (
        <div key={message.id} className="message" data-role={message.role}>
          {message.parts.map((part, i) => <Part key={i} part={part} />)}
        </div>
      ))}
      {error && <p className="error">{error.message}</p>}
      <form onSubmit={send}>
        <input id="prompt" value={input} onChange={(e) => setInput(e.target.value)} placeholder="Say something" />
        <button id="send" type="submit" disabled={busy}>Send</button>
        <button id="stop" type="button" onClick={() => stop()} disabled={!busy}>Stop</button>
      </form>
    </main>
  );
}

createRoot(document.getElementById("root")).render(<App />);
