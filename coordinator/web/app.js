// Strata's web page: a streaming chat over /v1/chat/completions and a live cluster view
// polled from /v1/cluster. No dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function fmtBytes(n) {
  if (n == null) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

// With `serve --api-key`, every API call needs the key: the page asks for it once (on the
// first 401) and keeps it in this browser's local storage.
const KEY_STORE = "strata-api-key";

function apiHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORE);
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function askForKey(why) {
  $("key-form").hidden = false;
  $("summary").textContent = why;
  $("api-key").focus();
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

// Reads an SSE body and calls onData with each `data:` payload.
async function readSse(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let sep;
    while ((sep = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, sep);
      buf = buf.slice(sep + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onData(data);
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.classList.add("streaming");
  $("send").disabled = true;
  $("stop").disabled = false;
  controller = new AbortController();
  let answer = "";
  let thought = "";
  // A Qwen3-family model's reasoning (delta.reasoning_content) shows dimmed above its answer.
  const thinkEl = document.createElement("div");
  thinkEl.className = "thinking";
  const answerEl = document.createElement("span");
  out.append(thinkEl, answerEl);
  let finish = null;
  let usage = null;
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        messages: history,
        stream: true,
        stream_options: { include_usage: true },
        temperature: parseFloat($("temperature").value),
        max_tokens: parseInt($("max-tokens").value, 10),
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      if (response.status === 401) askForKey("this server needs an API key");
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    await readSse(response, (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const delta = choice.delta || {};
      if (delta.reasoning_content) {
        thought += delta.reasoning_content;
        thinkEl.textContent = thought;
      }
      if (delta.content) {
        answer += delta.content;
        answerEl.textContent = answer;
      }
      if (delta.content || delta.reasoning_content) $("messages").scrollTop = $("messages").scrollHeight;
      if (choice.finish_reason) finish = choice.finish_reason;
    });
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      out.classList.add("error");
      out.textContent = answer + (answer ? "\n" : "") + "error: " + e.message;
    }
  } finally {
    out.classList.remove("streaming");
    const secs = (performance.now() - started) / 1000;
    const meta = document.createElement("span");
    meta.className = "meta";
    const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : 0;
    meta.textContent =
      (finish || "") +
      (usage ? ` · ${usage.completion_tokens} tokens in ${secs.toFixed(1)} s` : "") +
      (cached ? ` · ${cached} of ${usage.prompt_tokens} prompt tokens reused` : "");
    out.appendChild(meta);
    history.push({ role: "assistant", content: answer });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function bar(parts) {
  const b = document.createElement("div");
  b.className = "bar";
  for (const [cls, from, width, title] of parts) {
    const s = document.createElement("span");
    s.className = cls;
    s.style.left = (100 * from).toFixed(2) + "%";
    s.style.width = Math.max(0.5, 100 * width).toFixed(2) + "%";
    s.title = title;
    b.appendChild(s);
  }
  return b;
}

function renderCluster(c) {
  $("model").textContent = `${c.model} · context ${c.ctx}`;
  $("rate").textContent = `${c.tokens_per_s.toFixed(1)} tok/s`;
  const pool = c.kv_pool ? ` · KV pool ${c.kv_pool.used_blocks}/${c.kv_pool.blocks} blocks used (${c.kv_pool.positions} positions)` : "";
  const pc = c.prefix_cache;
  const cache = pc && pc.sequences ? ` · prefix cache ${pc.sequences} finished sequences (${pc.blocks} blocks), ${pc.hits} reused` : "";
  const recovered = c.last_recovery ? ` · ${c.recoveries} re-plan(s), last ${c.last_recovery.replan_seconds.toFixed(1)} s without ${c.last_recovery.left_out.join(", ") || "-"}` : "";
  const degraded = c.state === "degraded" ? `DEGRADED: ${c.error} · `
    : c.state === "recovering" ? `RECOVERING (${c.recovering}) · ` : "";
  $("summary").textContent = `${degraded}${c.nodes.length} node(s) · ${c.n_layer} layers · ${c.active_sequences} active, ${c.queued} queued (max ${c.max_seqs})${pool}${cache} · ${c.rows_per_step.toFixed(1)} rows/step · ${c.generated_tokens_total} tokens generated${recovered}`;
  const nodes = $("nodes");
  nodes.replaceChildren();
  for (const n of c.nodes) {
    const div = document.createElement("div");
    div.className = "node";
    const [a, b] = n.layers;
    const name = document.createElement("div");
    name.innerHTML = "";
    const strong = document.createElement("span");
    strong.className = "name";
    strong.textContent = n.name;
    name.append(strong, ` · ${n.device}`);
    div.appendChild(name);
    const l = document.createElement("div");
    l.className = "legend";
    l.textContent = `layers ${a}–${b - 1} (${b - a} of ${c.n_layer})`;
    div.appendChild(l);
    div.appendChild(bar([["layers", a / c.n_layer, (b - a) / c.n_layer, `layers ${a}..${b}`]]));
    const total = n.memory_bytes || (n.weight_bytes + n.cache_bytes) || 1;
    const m = document.createElement("div");
    m.className = "legend";
    m.textContent = `weights ${fmtBytes(n.weight_bytes)} · cache ${fmtBytes(n.cache_bytes)}` + (n.memory_bytes ? ` of ${fmtBytes(n.memory_bytes)}` : "") + ` · ${n.sequences} seq · ${n.mean_step_ms.toFixed(1)} ms/step`;
    div.appendChild(m);
    div.appendChild(bar([
      ["weights", 0, n.weight_bytes / total, "weights " + fmtBytes(n.weight_bytes)],
      ["cache", n.weight_bytes / total, n.cache_bytes / total, "cache " + fmtBytes(n.cache_bytes)],
    ]));
    if (n.kv_pool) {
      const p = n.kv_pool;
      const k = document.createElement("div");
      k.className = "legend";
      k.textContent = `KV pool ${p.used_blocks} of ${p.blocks} blocks used (${p.free_blocks} free, ${p.block_size} positions each)`;
      div.appendChild(k);
      div.appendChild(bar([["pool", 0, p.used_blocks / Math.max(1, p.blocks), `${p.used_blocks} blocks held`]]));
    }
    const busy = document.createElement("div");
    busy.className = "legend";
    busy.textContent = `busy ${(100 * n.busy_fraction).toFixed(0)}% of the time`;
    div.appendChild(busy);
    div.appendChild(bar([["busy", 0, n.busy_fraction, `computing ${(100 * n.busy_fraction).toFixed(0)}% of the last 5 s`]]));
    nodes.appendChild(div);
  }
}

async function poll() {
  try {
    const r = await fetch("/v1/cluster", { headers: apiHeaders() });
    if (r.status === 401) {
      askForKey(localStorage.getItem(KEY_STORE) ? "the API key was refused: enter it again" : "this server needs an API key");
    } else if (r.ok) {
      $("key-form").hidden = true;
      renderCluster(await r.json());
    }
  } catch (e) {
    $("summary").textContent = "server unreachable";
  }
  setTimeout(poll, 1000);
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  $("api-key").value = "";
  $("key-form").hidden = true;
  $("summary").textContent = "loading…";
});
$("reset").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
});
poll();
