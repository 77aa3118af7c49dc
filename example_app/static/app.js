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
