// flask-immutant console: polls api/status every second and renders it (the past minutes:
// console_history.js); buttons post to
// api/control with the session's CSRF token. Every URL is relative to the page, so the console
// works wherever it is mounted. Data is only ever inserted as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const ACTIONS = [["ENABLED", "enable"], ["DISABLED", "disable"], ["STOPPED", "stop"]];
let csrf = null;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function when(value) {
  if (value === null || value === undefined || value === "") return "–";
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  const seconds = Math.round((Date.now() - date.getTime()) / 1000);
  if (Math.abs(seconds) < 90) return seconds >= 0 ? `${seconds}s ago` : `in ${-seconds}s`;
  return date.toLocaleString();
}

function badge(state) {
  return el("span", {class: `badge ${String(state || "unknown").toLowerCase()}`}, state || "?");
}

function controls(scope, current) {
  return el("div", {class: "controls"}, ACTIONS.map(([state, label]) =>
    el("button", {
      type: "button", class: `act ${label}`, textContent: label, disabled: current === state,
      "data-state": state, "data-node": scope.node || "", "data-context": scope.context_path || "",
      title: `${label} ${scope.context_path ? scope.context_path + " on " : ""}${scope.node || "every node"}`,
    })));
}

function loadBar(value) {
  const pct = Math.max(0, Math.min(100, Number(value) || 0));
  const bar = el("div", {class: "fill"});
  bar.style.width = `${pct}%`;  // CSSOM, which the page's CSP allows (a style attribute it would not)
  return el("div", {class: "load", title: `load factor ${pct} (100 = idle)`}, el("div", {class: "bar"}, bar), el("span", {}, pct));
}

function fill(id, rows, empty) {
  const body = $(id).tBodies[0];
  const count = $(`${id}-count`);
  if (count) count.textContent = rows.length ? `(${rows.length})` : "";
  const columns = $(id).tHead.rows[0].cells.length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", {class: "empty"}, el("td", {colSpan: columns}, empty))]));
}

function render(doc) {
  const members = doc.members || [];
  const contexts = doc.contexts || [];
  $("summary").textContent = `cluster ${doc.cluster} · ${members.length} node(s) · store ${doc.store ? doc.store.url : "?"}`;

  const byNode = {};
  for (const c of contexts) (byNode[c.node] = byNode[c.node] || []).push(c);
  const names = [...new Set([...members.map((m) => m.name), ...Object.keys(byNode)])].sort();
  fill("nodes", names.map((name) => {
    const m = members.find((x) => x.name === name) || {};
    const own = byNode[name] || [];
    const states = [...new Set(own.map((c) => c.state))];
    const shared = states.length === 1 ? states[0] : null;
    return el("tr", {"data-node": name},
      el("td", {class: "strong"}, name, m.name ? null : el("span", {class: "muted"}, " (no heartbeat)")),
      el("td", {}, m.address ? `${m.address}:${(m.ports || {}).http || "?"}` : "–"),
      el("td", {}, when(m.up_since)),
      el("td", {}, when(m.last_heartbeat)),
      el("td", {}, own.length ? own.map((c) => el("span", {class: "pair"}, c.context_path, " ", badge(c.state))) : "none"),
      el("td", {}, controls({node: name}, shared)));
  }), "no node is running in this cluster");

  fill("contexts", contexts.map((c) => el("tr", {"data-key": `${c.node}|${c.context_path}`, "data-state": c.state},
    el("td", {class: "strong"}, c.context_path),
    el("td", {}, c.node),
    el("td", {}, c.app),
    el("td", {}, `${c.host}:${c.port}`),
    el("td", {class: "state"}, badge(c.state)),
    el("td", {}, loadBar(c.load)),
    el("td", {}, c.weight === c.load ? `${c.weight}` : `${c.weight} (manual)`),
    el("td", {}, controls({node: c.node, context_path: c.context_path}, c.state)))), "no context: no app is ready on any node");

  fill("deployments", (doc.deployments || []).map((d) => el("tr", {},
    el("td", {class: "strong"}, d.name),
    el("td", {}, d.error ? el("span", {class: "error"}, d.error) : `v${d.version}`),
    el("td", {}, d.context_path || "–"),
    el("td", {}, d.app || d.root || "–"),
    el("td", {}, Object.entries(d.nodes || {}).map(([node, info]) =>
      el("span", {class: "pair", title: info.error || ""}, node, " ", badge(info.state)))))), "nothing deployed");

  fill("daemons", (doc.daemons || []).map((d) => el("tr", {},
    el("td", {class: "strong"}, d.name),
    el("td", {}, d.singleton ? "singleton" : "per node"),
    el("td", {}, badge(d.state)),
    el("td", {}, d.node || "–"),
    el("td", {}, when(d.since)),
    el("td", {title: d.last_error || ""}, d.restarts ?? 0))), "no daemons");

  const queueRows = [];
  for (const q of doc.queues || []) {
    if (q.kind === "topic") {
      queueRows.push(el("tr", {}, el("td", {class: "strong"}, q.name), el("td", {}, "topic"),
        el("td", {colSpan: 4, class: "muted"}, `${(q.subscriptions || []).length} subscription(s)`), el("td", {}, q.consumers)));
      for (const s of q.subscriptions || []) {
        queueRows.push(el("tr", {class: "sub"}, el("td", {}, `↳ ${s.durable_name || s.queue}`), el("td", {}, "subscription"),
          el("td", {}, s.depth ?? "–"), el("td", {}, s.in_flight ?? "–"), el("td", {}, s.delayed ?? "–"),
          el("td", {}, s.dead ?? "–"), el("td", {}, "")));
      }
    } else {
      queueRows.push(el("tr", {}, el("td", {class: "strong"}, q.name), el("td", {}, "queue"),
        el("td", {}, q.depth ?? "–"), el("td", {}, q.in_flight ?? "–"), el("td", {}, q.delayed ?? "–"),
        el("td", {class: q.dead ? "error" : ""}, q.dead ?? "–"), el("td", {}, q.consumers ?? "–")));
    }
  }
  fill("queues", queueRows, doc.queues === null ? "the broker did not answer" : "no queues");

  fill("jobs", (doc.jobs || []).map((j) => el("tr", {},
    el("td", {}, j.app), el("td", {class: "strong"}, j.name), el("td", {}, j.spec),
    el("td", {}, when(j.next_fire)), el("td", {}, when(j.last_fire)), el("td", {}, j.last_node || "–"),
    el("td", {}, j.fired ?? 0), el("td", {title: j.last_error || ""}, j.holder || "–"))), "no scheduled jobs");
}

function banner(text) {
  $("banner").textContent = text || "";
  $("banner").hidden = !text;
}

function showLogin(message) {
  csrf = null;
  clearTimeout(timer);
  $("console").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

async function poll() {
  clearTimeout(timer);
  try {
    const response = await fetch("api/status", {credentials: "same-origin", cache: "no-store"});
    if (response.status === 401 || response.status === 403) return showLogin("Your session has ended: log in again.");
    const body = await response.json();
    if (!response.ok) {
      banner(body.error || `status: HTTP ${response.status}`);
    } else {
      banner("");
      render(body.status);
      $("updated").textContent = `updated ${new Date(body.time * 1000).toLocaleTimeString()}`;
      $("live").classList.toggle("tick");
    }
  } catch (error) {
    banner(`the console did not answer: ${error}`);
  }
  timer = setTimeout(poll, POLL_MS);
}

function start(token) {
  csrf = token;
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = false;
  poll();
  pollHistory();  // console_history.js
}

async function post(url, body) {
  const headers = {"Content-Type": "application/json"};
  if (csrf) headers["X-CSRF-Token"] = csrf;
  const response = await fetch(url, {method: "POST", credentials: "same-origin", headers, body: JSON.stringify(body)});
  let data = {};
  try { data = await response.json(); } catch (_) { /* an empty or non-JSON answer */ }
  return {response, data};
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const {response, data} = await post("login", {token: $("token").value});
    if (!response.ok) return showLogin(data.error || `HTTP ${response.status}`);
    $("token").value = "";
    start(data.csrf);
  });
  $("logout").addEventListener("click", async () => {
    await post("logout", {});
    showLogin("");
  });
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button.act");
    if (!button) return;
    button.disabled = true;
    const {response, data} = await post("api/control", {
      state: button.dataset.state, node: button.dataset.node || null, context_path: button.dataset.context || null,
    });
    if (response.status === 401) return showLogin("Your session has ended: log in again.");
    banner(response.ok ? "" : (data.error || `HTTP ${response.status}`));
    poll();
  });
  const response = await fetch("api/session", {credentials: "same-origin", cache: "no-store"});
  const session = await response.json();
  if (session.authenticated) start(session.csrf); else showLogin("");
});
