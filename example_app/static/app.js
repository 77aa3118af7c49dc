// The "Try it" buttons: fire the endpoint, show the status and the JSON it returned.
"use strict";

function randomMessage() {
  const words = ["hello", "ping", "zeal", "shared", "worker", "atomic", "stream", "cache"];
  const word = words[Math.floor(Math.random() * words.length)];
  return `${word}-${Math.random().toString(16).slice(2, 10)}`;
}

async function fire(button) {
  const status = document.getElementById("status");
  const output = document.getElementById("output");
  let url = button.dataset.endpoint;
  if (button.hasAttribute("data-random-msg")) {
    url += (url.includes("?") ? "&" : "?") + "msg=" + encodeURIComponent(randomMessage());
  }
  status.textContent = `GET ${url} …`;
  status.dataset.state = "pending";
  const started = performance.now();
  try {
    const response = await fetch(url, { headers: { Accept: "application/json" } });
    const text = await response.text();
    let shown = text;
    try {
      shown = JSON.stringify(JSON.parse(text), null, 2);
    } catch (_) {
      // not JSON: show it as it came
    }
    const ms = (performance.now() - started).toFixed(1);
    status.textContent = `GET ${url} → ${response.status} in ${ms} ms`;
    status.dataset.state = response.ok ? "done" : "error";
    status.dataset.code = String(response.status);
    output.textContent = shown;
  } catch (err) {
    status.textContent = `GET ${url} failed: ${err}`;
    status.dataset.state = "error";
    output.textContent = "";
  }
  output.dataset.endpoint = button.dataset.endpoint;
}

for (const button of document.querySelectorAll("button[data-endpoint]")) {
  button.addEventListener("click", () => fire(button));
}

// The backend badge: which Store backend serves this app.
async function showBackend() {
  const badge = document.getElementById("backend-badge");
  try {
    const info = await (await fetch("/demo/backend")).json();
    badge.textContent = `backend: ${info.backend}`;
    badge.dataset.backend = info.backend;
  } catch (err) {
    badge.textContent = "backend: unknown";
  }
}

// "Hit every worker": each answer closes its connection, so each request may reach another
// worker; the list shows the shared count next to the pid that answered.
async function hitEveryWorker() {
  const list = document.getElementById("hits-list");
  const summary = document.getElementById("hits-summary");
  const button = document.getElementById("btn-hit-workers");
  button.disabled = true;
  list.textContent = "";
  summary.dataset.state = "pending";
  const pids = new Set();
  const totals = [];
  try {
    for (let i = 0; i < 10; i++) {
      const body = await (await fetch("/demo/workers/hit", { cache: "no-store" })).json();
      pids.add(body.pid);
      totals.push(body.total_requests);
      const li = document.createElement("li");
      li.textContent = `count ${body.total_requests} from worker ${body.pid}`;
      li.dataset.pid = String(body.pid);
      li.dataset.total = String(body.total_requests);
      list.append(li);
    }
    summary.textContent = `${pids.size} worker(s) answered (${[...pids].join(", ")}); ` +
      `count ${totals[0]} to ${totals[totals.length - 1]}`;
    summary.dataset.state = "done";
  } catch (err) {
    summary.textContent = `failed: ${err}`;
    summary.dataset.state = "error";
  }
  summary.dataset.pids = [...pids].join(",");
  button.disabled = false;
}

document.getElementById("btn-hit-workers").addEventListener("click", hitEveryWorker);
showBackend();
