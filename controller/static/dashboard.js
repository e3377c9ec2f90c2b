// Jasper live dashboard: polls the admin JSON API every second and draws SVG (no libraries).
// Every string from the API (node and MP names come from operators and MPs) reaches the page
// through textContent or setAttribute only, never as markup.
"use strict";

const TOKEN_KEY = "jasper.admin_token";
const POLL_MS = 1000;
const KEEP_POINTS = 300; // client-side history: five minutes at one poll a second
const MAX_ENDPOINT_MARKS = 300; // beyond this the tree stops at receiver hosts
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
  "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  token: null,
  timer: null,
  trees: new Map(), // stream id -> {key, tree}
  clock: new Map(), // node -> [[t_ms, bound_ns]]
  lateMp: new Map(), // mp -> [[t_ms, late per s]]
  prevMp: null, // {t, byMp: Map(mp -> {late, released})}
  recentEp: new Map(), // endpoint -> {late, released, dLate, dReleased}
  polls: 0,
};

// --- DOM helpers (text only) ---------------------------------------------------------------
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function sv(tag, attrs, ...children) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
function $(id) { return document.getElementById(id); }

function fmtNs(ns) {
  if (ns === null || ns === undefined || !isFinite(ns)) return "–";
  const a = Math.abs(ns);
  if (a >= 1e9) return (ns / 1e9).toFixed(2) + " s";
  if (a >= 1e6) return (ns / 1e6).toFixed(2) + " ms";
  if (a >= 1e3) return (ns / 1e3).toFixed(1) + " µs";
  return Math.round(ns) + " ns";
}
function fmtNum(v, digits) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  return Number(v).toLocaleString("en-US", { maximumFractionDigits: digits ?? 0 });
}
function short(name, n) { return name.length > n ? name.slice(0, n - 1) + "…" : name; }
function push(map, key, point) {
  let a = map.get(key);
  if (!a) { a = []; map.set(key, a); }
  a.push(point);
  if (a.length > KEEP_POINTS) a.splice(0, a.length - KEEP_POINTS);
}

// --- auth ------------------------------------------------------------------------------------
class AuthError extends Error {}

async function api(path) {
  const r = await fetch(path, {
    headers: { Authorization: "Bearer " + state.token },
    cache: "no-store",
    credentials: "omit",
    referrerPolicy: "no-referrer",
  });
  if (r.status === 401 || r.status === 403) {
    let msg = r.status === 401 ? "unknown token" : "that token is not the admin token";
    try { const d = await r.json(); if (typeof d.detail === "string") msg = d.detail; } catch (_) {}
    throw new AuthError(msg);
  }
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function showLogin(message) {
  if (state.timer) clearTimeout(state.timer);
  state.timer = null;
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("status").textContent = "not connected";
}

function connect(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("login").hidden = true;
  $("logout").hidden = false;
  $("main").hidden = false;
  $("status").textContent = "connecting…";
  poll();
}

// --- polling ---------------------------------------------------------------------------------
async function poll() {
  state.timer = null;
  try {
    const snap = await api("/v1/dashboard");
    for (const s of snap.streams) {
      const key = s.plan_epoch + "/" + s.pending_epoch;
      const have = state.trees.get(s.id);
      if (s.plan_epoch !== null && (!have || have.key !== key)) {
        state.trees.set(s.id, { key, tree: await api("/v1/streams/" + s.id + "/tree") });
      }
    }
    record(snap);
    render(snap);
    state.polls += 1;
    $("status").textContent = "live · " + new Date(snap.at_ns / 1e6).toLocaleTimeString() +
      " · poll " + state.polls;
    document.body.dataset.polls = String(state.polls);
  } catch (e) {
    if (e instanceof AuthError) { showLogin(e.message); return; }
    $("status").textContent = "error: " + e.message + " (retrying)";
  }
  if (state.token) state.timer = setTimeout(poll, POLL_MS);
}

function record(snap) {
  const t = snap.at_ns / 1e6;
  for (const n of snap.nodes) {
    if (n.alive && n.clock_bound_ns !== null) push(state.clock, n.name, [t, n.clock_bound_ns]);
  }
  const byMp = new Map();
  for (const ep of snap.endpoints) {
    const mp = ep.mp ?? "(no MP)";
    const m = byMp.get(mp) || { late: 0, released: 0, endpoints: 0 };
    m.late += ep.late; m.released += ep.released; m.endpoints += 1;
    byMp.set(mp, m);
    const prev = state.recentEp.get(ep.name);
    state.recentEp.set(ep.name, {
      late: ep.late, released: ep.released,
      dLate: prev ? Math.max(0, ep.late - prev.late) : 0,
      dReleased: prev ? Math.max(0, ep.released - prev.released) : 0,
    });
  }
  if (state.prevMp) {
    const dt = Math.max(1e-3, (t - state.prevMp.t) / 1000);
    for (const [mp, m] of byMp) {
      const p = state.prevMp.byMp.get(mp);
      m.rate = p ? Math.max(0, m.late - p.late) / dt : 0;
      push(state.lateMp, mp, [t, m.rate]);
    }
  }
  state.prevMp = { t, byMp };
}

// --- charts ----------------------------------------------------------------------------------
// series: [{name, points: [[t_ms, value]]}]; draws lines with a legend, x as seconds ago.
function lineChart(series, { fmt, now, title }) {
  const W = 560, H = 190, L = 64, R = 10, T = 10, B = 24;
  const all = series.flatMap((s) => s.points);
  const root = el("div", { class: "chart-box" });
  const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-points": all.length });
  svg.append(sv("title", {}, title));
  root.append(svg);
  if (all.length === 0) {
    svg.append(sv("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "small" },
      "no data yet"));
    return root;
  }
  const t1 = now ?? Math.max(...all.map((p) => p[0]));
  let t0 = Math.min(...all.map((p) => p[0]));
  if (t1 - t0 < 10_000) t0 = t1 - 10_000;
  let y1 = Math.max(...all.map((p) => p[1]));
  const y0 = Math.min(0, ...all.map((p) => p[1]));
  if (y1 <= y0) y1 = y0 + 1;
  y1 *= 1.1;
  const x = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    svg.append(sv("line", { class: "grid-line", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    svg.append(sv("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end", class: "small" }, fmt(v)));
  }
  for (let i = 0; i <= 4; i++) {
    const t = t0 + ((t1 - t0) * i) / 4;
    svg.append(sv("text", { x: x(t), y: H - 6, "text-anchor": "middle", class: "small" },
      "-" + Math.round((t1 - t) / 1000) + " s"));
  }
  svg.append(sv("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(sv("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    const line = sv("polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 1.6,
      class: "series", "data-series": s.name });
    line.append(sv("title", {}, s.name));
    svg.append(line);
    if (s.points.length === 1) {
      const p = s.points[0];
      svg.append(sv("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: color }));
    }
    const item = el("span", {}, s.name);
    item.style.setProperty("--c", color);
    legend.append(item);
  });
  root.append(legend);
  return root;
}

// --- tree ------------------------------------------------------------------------------------
function nodeBox(x, y, name, cls, sub, tip) {
  const w = 118, h = sub ? 32 : 20;
  const g = sv("g", { class: "node " + cls, "data-node": name, transform: `translate(${x - w / 2},${y - h / 2})` });
  g.append(sv("title", {}, tip || name));
  g.append(sv("rect", { width: w, height: h }));
  g.append(sv("text", { x: w / 2, y: 14, "text-anchor": "middle" }, short(name, 18)));
  if (sub) g.append(sv("text", { x: w / 2, y: 27, "text-anchor": "middle", class: "small" }, sub));
  return g;
}

function healthOf(nodes, name) {
  const n = nodes.get(name);
  if (!n) return { cls: "unknown", sub: "not registered", tip: name + ": not registered" };
  const bound = n.clock_bound_ns === null ? "±?" : "±" + fmtNs(n.clock_bound_ns);
  const cls = n.alive ? "alive" : "dead";
  const sub = n.alive ? n.data_path + " · " + bound : "dead";
  const tip = `${n.name} (${n.role}): ${n.alive ? "alive" : "dead"}, data path ${n.data_path}, ` +
    `clock ${n.clock_status ?? "unknown"} ${bound}`;
  return { cls, sub, tip };
}

function drawTree(tree, nodes) {
  const rows = [[{ name: tree.publisher, kind: "publisher" }]];
  for (const level of tree.levels) rows.push(level.map((s) => ({ name: s.node, kind: "relay" })));
  const hosts = [...new Set(tree.endpoints.map((e) => e.host))].sort();
  rows.push(hosts.map((h) => ({ name: h, kind: "receiver" })));
  const showEps = tree.endpoints.length <= MAX_ENDPOINT_MARKS;
  const eps = showEps ? [...tree.endpoints].sort((a, b) =>
    a.host === b.host ? a.name.localeCompare(b.name) : a.host.localeCompare(b.host)) : [];
  const widest = Math.max(...rows.map((r) => r.length));
  const W = Math.max(760, widest * 130, eps.length * 14 + 40);
  const rowH = 58;
  const H = rows.length * rowH + (showEps && eps.length ? 46 : 0) + 10;
  const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, class: "tree-svg",
    "data-nodes": rows.flat().length, "data-endpoints": eps.length });
  svg.append(sv("title", {}, "Tree of stream " + tree.stream_id));
  const pos = new Map();
  rows.forEach((row, i) => row.forEach((n, j) => {
    pos.set(n.name, [((j + 0.5) * W) / row.length, 24 + i * rowH]);
  }));
  const epY = 24 + rows.length * rowH - 8;
  eps.forEach((e, j) => pos.set(e.name, [((j + 0.5) * W) / eps.length, epY]));
  const edges = sv("g", {});
  const hedge = new Set(tree.hedge_edges.map((e) => e[0] + "\u0000" + e[1]));
  const line = (a, b, isHedge) => {
    const p = pos.get(a), q = pos.get(b);
    if (!p || !q) return;
    edges.append(sv("line", { class: "edge" + (isHedge ? " hedge" : ""),
      x1: p[0], y1: p[1] + 10, x2: q[0], y2: q[1] - 10 }));
  };
  for (const [target, senders] of Object.entries(tree.parents)) {
    if (target.startsWith("s") && !showEps && !pos.has(target)) continue;
    for (const s of senders) line(s, target, hedge.has(s + "\u0000" + target));
  }
  if (tree.levels.length) line(tree.publisher, tree.levels[0][0].node, false);
  if (!showEps) {
    // Too many endpoints to mark: each relay's copies drawn to the hosts they reach.
    const seen = new Set();
    for (const e of tree.endpoints) {
      e.parents.forEach((p, k) => {
        const key = p + "\u0000" + e.host;
        if (!seen.has(key)) { seen.add(key); line(p, e.host, k > 0); }
      });
    }
  }
  svg.append(edges);
  rows.forEach((row) => row.forEach((n) => {
    const [x, y] = pos.get(n.name);
    if (n.kind === "publisher") {
      const h = healthOf(nodes, n.name);
      svg.append(nodeBox(x, y, n.name, "publisher " + h.cls, "publisher · " + (h.cls === "alive" ? "alive" : h.cls), h.tip));
    } else {
      const h = healthOf(nodes, n.name);
      svg.append(nodeBox(x, y, n.name, h.cls, h.sub, h.tip));
    }
  }));
  for (const e of eps) {
    const [x, y] = pos.get(e.name);
    const r = state.recentEp.get(e.name);
    const frac = r && r.dReleased ? r.dLate / r.dReleased : 0;
    const color = !r ? "#eceff2" : frac === 0 ? "#4caf50" : frac < 0.01 ? "#ff9800" : "#d32f2f";
    const hostPos = pos.get(e.host);
    if (hostPos) edges.append(sv("line", { class: "edge", x1: hostPos[0], y1: hostPos[1] + 10, x2: x, y2: y - 5 }));
    const c = sv("circle", { class: "ep", cx: x, cy: y, r: 5, fill: color, "data-endpoint": e.name });
    c.append(sv("title", {}, `${e.name} · MP ${e.mp ?? "?"} · ${e.addr}:${e.port} · ` +
      `late in the last poll ${r ? r.dLate : 0} of ${r ? r.dReleased : 0}`));
    svg.append(c);
  }
  if (showEps && eps.length) {
    svg.append(sv("text", { x: 6, y: H - 4, class: "small" },
      "endpoints: green on time in the last second, orange < 1% late, red ≥ 1% late; dashed: hedge copies"));
  }
  return svg;
}

// --- render ----------------------------------------------------------------------------------
function render(snap) {
  const nodes = new Map(snap.nodes.map((n) => [n.name, n]));
  const now = snap.at_ns / 1e6;
  const streams = clear($("streams"));
  for (const s of snap.streams) {
    const sec = el("div", { class: "panel stream", "data-stream": s.id });
    const entry = state.trees.get(s.id);
    const tree = entry ? entry.tree : null;
    const shape = tree ? ` · D=${tree.depth} F=${tree.fanout} H=${tree.hedge}` : "";
    sec.append(el("h2", {}, `Stream ${s.id} · ${s.name} · plan epoch ${s.plan_epoch ?? "none"}` +
      (s.pending_epoch !== null ? ` (switching to ${s.pending_epoch})` : "") + shape +
      ` · hold ${fmtNs(s.hold_ns)} (${s.hold_policy})`));
    const box = el("div", { class: "tree" });
    if (tree) box.append(drawTree(tree, nodes));
    else box.append(el("p", { class: "muted" }, "no plan yet"));
    sec.append(box);
    const w = s.hold_windows;
    const at = (d) => d.at_ns / 1e6;
    const grid = el("div", { class: "grid" });
    const holdPanel = el("div", { class: "panel chart", id: "chart-hold-" + s.id });
    holdPanel.append(el("h2", {}, "Hold in force over time (per delay window)"));
    holdPanel.append(lineChart([
      { name: "hold in force", points: w.map((d) => [at(d), d.hold_ns]) },
      { name: "delay estimate (p97 OWD)", points: w.filter((d) => d.count > 0).map((d) => [at(d), d.delay_estimate_ns]) },
      { name: "clock bounds (root + worst receiver)", points: w.map((d) => [at(d), d.bounds_ns]) },
    ], { fmt: fmtNs, now, title: "hold" }));
    const latePanel = el("div", { class: "panel chart", id: "chart-late-" + s.id });
    latePanel.append(el("h2", {}, "Late fraction per window (worst endpoint)"));
    latePanel.append(lineChart([
      { name: "late %", points: w.filter((d) => d.count > 0).map((d) => [at(d), d.late_fraction * 100]) },
    ], { fmt: (v) => v.toFixed(2) + " %", now, title: "late fraction" }));
    grid.append(holdPanel, latePanel);
    sec.append(grid);
    streams.append(sec);
  }

  const clockSeries = [...state.clock.entries()]
    .sort((a, b) => b[1][b[1].length - 1][1] - a[1][a[1].length - 1][1]).slice(0, COLORS.length)
    .map(([name, points]) => ({ name, points }));
  clear($("chart-clock")).append(lineChart(clockSeries, { fmt: fmtNs, now, title: "clock bounds" }));

  const mpSeries = [...state.lateMp.entries()]
    .sort((a, b) => b[1].reduce((x, p) => x + p[1], 0) - a[1].reduce((x, p) => x + p[1], 0))
    .slice(0, COLORS.length).map(([name, points]) => ({ name, points }));
  clear($("chart-late-mp")).append(lineChart(mpSeries,
    { fmt: (v) => fmtNum(v, 1) + "/s", now, title: "late per MP" }));

  $("fairness").textContent = snap.fairness_live ? "" :
    "Not available live. " + snap.fairness_note +
    " Live instead: the late fraction per delay window above, and late messages per MP.";

  const mpBody = clear($("mps").tBodies[0]);
  const mps = state.prevMp ? [...state.prevMp.byMp.entries()] : [];
  mps.sort((a, b) => b[1].late - a[1].late || a[0].localeCompare(b[0]));
  for (const [mp, m] of mps) {
    mpBody.append(el("tr", {}, el("td", {}, mp), el("td", { class: "num" }, m.endpoints),
      el("td", { class: "num" }, fmtNum(m.released)), el("td", { class: "num" }, fmtNum(m.late)),
      el("td", { class: "num" }, m.released ? fmtNum((100 * m.late) / m.released, 3) : "–"),
      el("td", { class: "num" }, m.rate === undefined ? "–" : fmtNum(m.rate, 1))));
  }
  $("mps-note").textContent = snap.endpoints_omitted ?
    `${snap.endpoints_omitted} endpoints report: more than the per-endpoint cap ` +
    "(metrics_endpoint_series); per-MP rows are off, the receivers' sums are in the node table." : "";

  const nodeBody = clear($("nodes").tBodies[0]);
  const order = { publisher: 0, relay: 1, receiver: 2 };
  const sorted = [...snap.nodes].sort((a, b) =>
    (order[a.role] ?? 3) - (order[b.role] ?? 3) || a.name.localeCompare(b.name));
  for (const n of sorted) {
    const counts = n.role === "receiver" ? `${fmtNum(n.released)} / ${fmtNum(n.late)}` :
      n.role === "relay" ? `${fmtNum(n.copies_in)} copies in` : "";
    nodeBody.append(el("tr", { "data-node": n.name },
      el("td", {}, n.name), el("td", {}, n.role),
      el("td", { class: n.alive ? "good" : "bad" }, n.alive ? "alive" : "dead"),
      el("td", {}, n.data_path), el("td", {}, n.clock_status ?? "–"),
      el("td", { class: "num" }, n.clock_bound_ns === null ? "–" : "±" + fmtNs(n.clock_bound_ns)),
      el("td", { class: "num" }, n.heartbeat_age_s === null ? "–" : n.heartbeat_age_s.toFixed(1) + " s ago"),
      el("td", { class: "num" }, n.plan_epoch ?? "–"), el("td", { class: "num" }, counts)));
  }
}

// --- start -----------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    if (t) connect(t);
  });
  $("logout").addEventListener("click", () => showLogin(""));
  const saved = sessionStorage.getItem(TOKEN_KEY);
  if (saved) connect(saved);
});
