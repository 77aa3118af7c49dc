// The multi-tab chat: one WebSocket per tab, messages fan out through WSRouter.
"use strict";

const params = new URLSearchParams(location.search);
const room = params.get("room") || "lobby";
const name = params.get("name") || `guest-${Math.random().toString(16).slice(2, 6)}`;

const statusEl = document.getElementById("chat-status");
const workerEl = document.getElementById("chat-worker");
const clientEl = document.getElementById("chat-client");
const logEl = document.getElementById("chat-log");
const form = document.getElementById("chat-form");
const input = document.getElementById("chat-input");
const send = document.getElementById("chat-send");
document.getElementById("chat-room").textContent = room;

function line(html, cls) {
  const li = document.createElement("li");
  if (cls) li.className = cls;
  li.append(...html);
  logEl.append(li);
  logEl.scrollTop = logEl.scrollHeight;
  return li;
}

function span(text, cls) {
  const s = document.createElement("span");
  s.textContent = text;
  if (cls) s.className = cls;
  return s;
}

function setStatus(state, text) {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

const scheme = location.protocol === "https:" ? "wss" : "ws";
const url = `${scheme}://${location.host}/ws/chat?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}`;
let ws = null;
let connections = 0;

// Each call opens a new WebSocket (a new TCP connection), which any worker may accept.
function connect() {
  if (ws !== null) {
    ws.onclose = null;
    ws.close(1000, "new connection");
  }
  connections += 1;
  const socket = new WebSocket(url);
  ws = socket;
  send.disabled = true;
  setStatus("connecting", "connecting…");
  workerEl.textContent = "worker ?";
  delete workerEl.dataset.pid;
  socket.addEventListener("open", () => {
    setStatus("open", "joining…");
    socket.send(JSON.stringify({ type: "join" }));
  });
  socket.onclose = (ev) => {
    setStatus("closed", `closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
    send.disabled = true;
  };
  socket.addEventListener("error", () => setStatus("error", "error"));
  socket.addEventListener("message", (ev) => onMessage(ev));
}

function onMessage(ev) {
  let msg;
  try {
    msg = JSON.parse(ev.data);
  } catch (_) {
    return;
  }
  if (msg.type === "welcome") {
    workerEl.textContent = `worker ${msg.worker_pid}`;
    workerEl.dataset.pid = String(msg.worker_pid);
    workerEl.dataset.connection = String(connections);
    clientEl.textContent = `you are ${msg.client}`;
    clientEl.dataset.client = msg.client;
    setStatus("ready", "connected");
    send.disabled = false;
    const li = line([span(`joined ${msg.room} on worker ${msg.worker_pid} (connection ${connections})`)], "system");
    li.dataset.testid = "chat-joined";
    li.dataset.pid = String(msg.worker_pid);
  } else if (msg.type === "message") {
    const li = line([span(`${msg.sender} (worker ${msg.worker_pid})`, "meta"), span(msg.text)]);
    li.dataset.testid = "chat-message";
    li.dataset.sender = msg.sender;
    li.dataset.text = msg.text;
  } else if (msg.type === "presence") {
    line([span(`${msg.client} ${msg.event === "join" ? "joined" : "left"}`)], "system");
  } else if (msg.type === "error") {
    line([span(`error: ${msg.error}`)], "system");
  }
}

document.getElementById("chat-reconnect").addEventListener("click", connect);
connect();

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ text }));
  input.value = "";
});
