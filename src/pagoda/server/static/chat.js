// Pagoda chat page: one WebSocket to /v1/ws (protocol in docs/websocket.md), streamed replies,
// a stop button that sends {"type": "cancel"}, and per-reply TTFT and tokens/s.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  conversation: [],   // [{role, content}] of finished turns
  active: null,       // the reply being streamed: {id, el, textEl, text, t0, tFirst, tLast, tokens}
  nextId: 1,
  model: null,
};

function apiKey() { return $("api-key").value.trim(); }

function setStatus(text) { $("status").textContent = text; }

async function loadModel() {
  const headers = apiKey() ? { Authorization: "Bearer " + apiKey() } : {};
  try {
    const res = await fetch("/v1/models", { headers });
    if (!res.ok) { $("model").textContent = "model unavailable (" + res.status + ")"; return; }
    const body = await res.json();
    state.model = body.data[0].id;
    $("model").textContent = state.model;
  } catch (err) {
    $("model").textContent = "server unreachable";
  }
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = apiKey() ? "?api_key=" + encodeURIComponent(apiKey()) : "";
  const ws = new WebSocket(proto + "//" + location.host + "/v1/ws" + query);
  state.ws = ws;
  ws.onopen = () => { $("conn").textContent = "connected"; $("send").disabled = !!state.active; };
  ws.onclose = () => {
    $("conn").textContent = "offline";
    if (state.active) finishReply("error", "connection closed");
    // Retry only if this is still the current socket, now and when the timer fires: a key
    // change in between has already opened a newer one, which a late retry would replace.
    if (state.ws === ws) setTimeout(() => { if (state.ws === ws) connect(); }, 1000);
  };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
}

function bubble(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.dataset.role = role;
  const textEl = document.createElement("span");
  textEl.className = "text";
  textEl.textContent = text;
  el.appendChild(textEl);
  $("log").appendChild(el);
  $("log").scrollTop = $("log").scrollHeight;
  return { el, textEl };
}

// Returns whether the question went out; it does not while the socket is (re)connecting or a
// reply is still streaming, and the caller then keeps the text in the input box.
function send(question) {
  if (state.active) return false;
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    setStatus("not connected yet; try again in a moment");
    return false;
  }
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.conversation, { role: "user", content: question });
  state.conversation.push({ role: "user", content: question });
  bubble("user", question);
  const { el, textEl } = bubble("assistant", "");
  el.dataset.state = "waiting";
  const id = "r" + state.nextId++;
  state.active = { id, el, textEl, text: "", t0: performance.now(), tFirst: null, tLast: null,
                   tokens: 0 };
  state.ws.send(JSON.stringify({
    type: "chat", id, messages,
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) || 256,
  }));
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating…");
  return true;
}

function onMessage(msg) {
  const reply = state.active;
  if (!reply || msg.id !== reply.id) return;
  if (msg.type === "delta") {
    const now = performance.now();
    if (reply.tFirst === null) reply.tFirst = now;
    reply.tLast = now;
    reply.tokens += msg.token_ids.length;
    reply.text += msg.text;
    reply.textEl.textContent = reply.text;
    reply.el.dataset.state = "streaming";
    $("log").scrollTop = $("log").scrollHeight;
  } else if (msg.type === "done") {
    if (msg.cancelled) finishReply("stopped");
    else finishReply("done", msg.choices.map((c) => c.finish_reason).join(","));
  } else if (msg.type === "error") {
    finishReply("error", msg.error.message);
  }
}

function finishReply(how, detail) {
  const reply = state.active;
  if (!reply) return;
  state.active = null;
  reply.el.dataset.state = how;
  if (how === "error") reply.el.classList.add("error");
  if (reply.text) state.conversation.push({ role: "assistant", content: reply.text });
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.dataset.testid = "stats";
  const parts = [];
  if (reply.tFirst !== null) {
    parts.push("TTFT " + Math.round(reply.tFirst - reply.t0) + " ms");
    const span = (reply.tLast - reply.tFirst) / 1000;
    if (reply.tokens > 1 && span > 0) parts.push(((reply.tokens - 1) / span).toFixed(1) + " tok/s");
    parts.push(reply.tokens + " tokens");
  }
  parts.push(how === "done" ? "finish: " + detail : how + (detail ? ": " + detail : ""));
  stats.textContent = parts.join(" · ");
  reply.el.appendChild(stats);
  $("send").disabled = false;
  $("stop").disabled = true;
  setStatus(how === "stopped" ? "stopped" : how === "error" ? "error" : "done");
}

function stop() {
  const reply = state.active;
  if (reply && state.ws) state.ws.send(JSON.stringify({ type: "cancel", id: reply.id }));
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("input").value.trim();
  if (question && send(question)) $("input").value = "";
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", stop);
$("clear").addEventListener("click", () => {
  state.conversation = [];
  $("log").textContent = "";
  setStatus("");
});
$("temperature").addEventListener("input", () => { $("temp-out").textContent = $("temperature").value; });
$("api-key").addEventListener("change", () => {
  loadModel();
  if (state.ws) { const old = state.ws; state.ws = null; old.close(); }
  connect();
});

loadModel();
connect();
