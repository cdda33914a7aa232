// flask-immutant console: the past minutes. Polls api/history every few seconds and draws, as
// hand-written SVG, per-queue throughput and depth, per-node load factor, and the cluster's events
// on a timeline (failovers, deploys, leaves...). Text goes in as text nodes only, never as HTML.
"use strict";

const HISTORY_MS = 5000;
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#4a5568"];
const W = 560, H = 150, PAD = {left: 40, right: 10, top: 10, bottom: 20};
let historyTimer = null;

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// What an event means on the timeline: [class, label]; the class picks its colour in console.css.
function eventClass(e) {
  const f = e.fields || {};
  if (e.kind === "lease.acquired") return f.failover ? ["failover", `failover: ${f.lease} to ${e.node}`] : ["lease", `${f.lease} to ${e.node}`];
  if (e.kind === "member.left") return f.reason === "timeout" ? ["failover", `${f.member} timed out`] : ["leave", `${f.member} left`];
  if (e.kind === "member.joined") return ["join", `${f.member} joined`];
  if (e.kind.startsWith("deploy.") || e.kind.startsWith("undeploy.")) {
    const what = e.kind === "deploy.node" ? `${f.deployment} v${f.version} ${f.state} on ${e.node}` :
      e.kind === "undeploy.node" ? `${f.deployment} undeployed on ${e.node}` : `${e.kind.split(".")[0]} ${f.deployment}`;
    return [f.state === "failed" || f.state === "refused" ? "failover" : "deploy", what];
  }
  if (e.kind === "message.dead") return ["dead", `dead letter on ${f.destination || f.queue}`];
  if (e.kind === "store.outage") return ["failover", `store outage seen by ${e.node} (${f.seconds}s)`];
  if (e.kind === "ctl.action") return ["ctl", `ctl ${f.action} ${f.scope_node || "every node"}${f.context_path ? " " + f.context_path : ""}`];
  if (e.kind === "daemon.restarted") return ["dead", `daemon ${f.daemon} restarted on ${e.node}`];
  return ["other", e.kind];
}

function axes(t0, t1, top, unit) {
  const x = (t) => PAD.left + (W - PAD.left - PAD.right) * (t - t0) / Math.max(1, t1 - t0);
  const group = svg("g", {class: "axis"});
  group.append(svg("line", {x1: PAD.left, x2: W - PAD.right, y1: H - PAD.bottom, y2: H - PAD.bottom}));
  for (let i = 0; i <= 3; i++) {
    const t = t0 + (t1 - t0) * i / 3;
    const ago = t1 - t;
    const label = i === 3 ? "now" : t1 - t0 <= 300 ? `-${Math.round(ago)}s` : `-${Math.round(ago / 60)}m`;
    group.append(svg("text", {x: x(t), y: H - 5, "text-anchor": i === 0 ? "start" : i === 3 ? "end" : "middle"}, label));
  }
  group.append(svg("text", {x: 2, y: PAD.top + 8}, `${top}${unit}`));
  group.append(svg("text", {x: 2, y: H - PAD.bottom}, "0"));
  return [x, group];
}

function niceTop(value) {
  if (value <= 1) return 1;
  const step = Math.pow(10, Math.floor(Math.log10(value)));
  return Math.ceil(value / step) * step;
}

// One line chart: series = {name: [[t, value], ...]}.
function lineChart(id, title, series, t0, t1, unit, fixedTop) {
  const box = $(id);
  box.replaceChildren();
  const names = Object.keys(series).sort();
  const values = names.flatMap((n) => series[n].map((p) => p[1])).filter((v) => typeof v === "number");
  const top = fixedTop || niceTop(Math.max(0, ...values));
  const [x, group] = axes(t0, t1, top, unit);
  const y = (v) => H - PAD.bottom - (H - PAD.top - PAD.bottom) * Math.max(0, Math.min(top, v)) / top;
  const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title}, group);
  const legend = el("div", {class: "legend"});
  names.forEach((name, i) => {
    const colour = PALETTE[i % PALETTE.length];
    const points = series[name].filter((p) => typeof p[1] === "number");
    if (points.length) {
      chart.append(svg("polyline", {points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
                                    fill: "none", stroke: colour, "stroke-width": 1.8},
                       svg("title", {}, name)));
    }
    const swatch = el("span", {class: "swatch"});
    swatch.style.background = colour;  // CSSOM: allowed by the page's CSP
    const last = points.length ? points[points.length - 1][1] : null;
    legend.append(el("span", {class: "pair"}, swatch, `${name} `, el("span", {class: "muted"}, last === null ? "–" : +last.toFixed(2))));
  });
  if (!names.length) legend.append(el("span", {class: "muted"}, "no data yet"));
  box.append(el("h3", {}, title), chart, legend);
}

function timeline(events, t0, t1) {
  const box = $("timeline");
  box.replaceChildren();
  const height = 46;
  const x = (t) => PAD.left + (W * 2 - PAD.left - PAD.right) * (t - t0) / Math.max(1, t1 - t0);
  const chart = svg("svg", {viewBox: `0 0 ${W * 2} ${height}`, class: "chart timeline", role: "img",
                            "aria-label": "cluster events"});
  chart.append(svg("line", {class: "axis-line", x1: PAD.left, x2: W * 2 - PAD.right, y1: 24, y2: 24}));
  chart.append(svg("text", {class: "axis-text", x: PAD.left, y: 44}, `-${Math.round((t1 - t0) / 60)}m`));
  chart.append(svg("text", {class: "axis-text", x: W * 2 - PAD.right, y: 44, "text-anchor": "end"}, "now"));
  const notable = [];
  for (const e of events) {
    const [cls, label] = eventClass(e);
    const at = Math.max(t0, Math.min(t1, e.time));
    chart.append(svg("circle", {class: `ev ${cls}`, cx: x(at).toFixed(1), cy: 24, r: cls === "failover" ? 6 : 4},
                     svg("title", {}, `${new Date(e.time * 1000).toLocaleTimeString()} ${label}`)));
    if (cls !== "lease" && cls !== "other") notable.push([e, cls, label]);
  }
  const list = el("ul", {class: "events"}, notable.slice(-8).reverse().map(([e, cls, label]) =>
    el("li", {}, el("span", {class: `dot ${cls}`}), el("span", {class: "muted"}, new Date(e.time * 1000).toLocaleTimeString()), ` ${label}`)));
  if (!notable.length) list.append(el("li", {class: "muted"}, "nothing happened in these minutes"));
  box.append(chart, list);
}

function renderHistory(body) {
  const t1 = body.now, t0 = body.now - body.minutes * 60;
  const samples = body.samples || [];
  const throughput = {}, depth = {}, load = {};
  samples.forEach((s, i) => {
    for (const [name, q] of Object.entries(s.queues || {})) {
      (depth[name] = depth[name] || []).push([s.t, q.depth]);
      const before = i > 0 ? (samples[i - 1].queues || {})[name] : null;
      if (before && typeof q.handled === "number" && typeof before.handled === "number") {
        const rate = Math.max(0, q.handled - before.handled) / Math.max(0.001, s.t - samples[i - 1].t);
        (throughput[name] = throughput[name] || []).push([s.t, rate]);
      }
    }
    for (const [node, factor] of Object.entries(s.nodes || {})) (load[node] = load[node] || []).push([s.t, factor]);
  });
  timeline(body.events || [], t0, t1);
  lineChart("chart-throughput", "Throughput per queue (messages/s)", throughput, t0, t1, "/s");
  lineChart("chart-depth", "Depth per queue (messages waiting)", depth, t0, t1, "");
  lineChart("chart-load", "Load factor per node (100 = idle)", load, t0, t1, "", 100);
  $("history-note").textContent = `${samples.length} samples, one every ${body.every}s; ${(body.events || []).length} events`;
}

async function pollHistory() {
  clearTimeout(historyTimer);
  try {
    const minutes = $("history-minutes").value;
    const response = await fetch(`api/history?minutes=${encodeURIComponent(minutes)}`, {credentials: "same-origin", cache: "no-store"});
    if (response.status === 401 || response.status === 403) return;  // logged out: console.js shows the login
    if (response.ok) renderHistory(await response.json());
  } catch (error) {
    $("history-note").textContent = `history unavailable: ${error}`;
  }
  historyTimer = setTimeout(pollHistory, HISTORY_MS);
}

window.addEventListener("DOMContentLoaded", () => {
  $("history-minutes").addEventListener("change", pollHistory);
});
