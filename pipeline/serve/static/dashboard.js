// aipipe operator dashboard: renders /dashboard/state, then every server-sent "snapshot" event.
// No build step: plain browser JavaScript; charts by the vendored uPlot (static/vendor/README.md).
"use strict";

const $ = (sel) => document.querySelector(sel);
const STATE_LEVEL = { CLOSED: 0, HALF_OPEN: 1, OPEN: 2 };
const fmtUsd = (v) => (v == null ? "-" : v < 0.01 && v > 0 ? v.toFixed(6) : v.toFixed(4));
const fmtMs = (v) => (v == null ? "-" : v.toFixed(1));
const fmtTime = (ms) => new Date(ms).toLocaleTimeString();
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

let trafficPlot = null;
let circuitPlot = null;
let circuitProviders = "";
let lastSnapshot = null;
let openDetail = null;

function setConn(kind, text) {
  const el = $("#conn");
  el.className = "conn " + kind;
  el.textContent = text;
}

function renderProviders(snap) {
  const html = snap.providers.map((p) => {
    const transitions = p.transitions.slice(-5).reverse().map((t) =>
      `<li>${fmtTime(t.at_ms)} ${esc(t.from_state)} → ${esc(t.to_state)}: ${esc(t.reason)}</li>`).join("");
    return `<div class="card" data-provider="${esc(p.name)}">
      <h3><span>${esc(p.name)}</span><span class="state ${esc(p.state)}" data-testid="state">${esc(p.state)}</span></h3>
      <div>${p.healthy ? "healthy" : "<b class='error'>unhealthy</b>"} · errors ${(p.error_rate * 100).toFixed(1)} %</div>
      <div>latency p50 ${fmtMs(p.p50_ms)} ms · p95 ${fmtMs(p.p95_ms)} ms · ${p.calls_per_s} calls/s</div>
      ${p.last_error ? `<div class="muted">last error: ${esc(p.last_error)}</div>` : ""}
      <ul class="transitions">${transitions}</ul>
    </div>`;
  }).join("");
  $("#providers").innerHTML = html || "<p class='muted'>No provider yet.</p>";
}

function circuitSeries(snap) {
  const now = Math.floor(Date.parse(snap.at) / 1000);
  const xs = [];
  for (let t = now - 300; t <= now; t += 5) xs.push(t);
  const ys = snap.providers.map((p) => {
    const tr = p.transitions.map((t) => ({ at: t.at_ms / 1000, from: t.from_state, to: t.to_state }));
    return xs.map((x) => {
      let state = tr.length ? tr[0].from : p.state;
      for (const t of tr) if (t.at <= x) state = t.to;
      if (!tr.length) state = p.state;
      return STATE_LEVEL[state] ?? 0;
    });
  });
  return [xs, ...ys];
}

function renderCircuitChart(snap) {
  const names = snap.providers.map((p) => p.name).join(",");
  const data = circuitSeries(snap);
  const el = $("#circuit-chart");
  if (!circuitPlot || names !== circuitProviders) {
    if (circuitPlot) circuitPlot.destroy();
    const palette = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b"];
    circuitPlot = new uPlot({
      title: "circuit state over the last 5 minutes (0 closed, 1 half-open, 2 open)",
      width: Math.max(400, el.clientWidth || 800), height: 160,
      scales: { y: { range: [0, 2.2] } },
      series: [{}, ...snap.providers.map((p, i) => ({ label: p.name, stroke: palette[i % palette.length], paths: uPlot.paths.stepped({ align: 1 }) }))],
      axes: [{}, { values: (u, vals) => vals.map((v) => ["closed", "half-open", "open"][Math.round(v)] ?? "") }],
    }, data, el);
    circuitProviders = names;
  } else {
    circuitPlot.setData(data);
  }
}

function renderTraffic(snap) {
  const s = snap.traffic.seconds;
  const xs = s.map((b) => b.t);
  const data = [xs, s.map((b) => b.ok - b.cached - b.fallback), s.map((b) => b.cached), s.map((b) => b.fallback),
    s.map((b) => Object.values(b.errors).reduce((a, n) => a + n, 0))];
  const el = $("#traffic-chart");
  if (!trafficPlot) {
    trafficPlot = new uPlot({
      title: "answers per second by outcome",
      width: Math.max(400, el.clientWidth || 800), height: 200,
      series: [{}, { label: "ok", stroke: "#1b873f" }, { label: "cached", stroke: "#2b6cb0" },
        { label: "fallback", stroke: "#b7791f" }, { label: "error", stroke: "#c53030" }],
    }, data, el);
  } else {
    trafficPlot.setData(data);
  }
  const errs = Object.entries(snap.traffic.errors_last_minute).map(([k, n]) => `${k} ${n}`).join(", ");
  $("#traffic-summary").textContent = `last minute: ${snap.traffic.per_s_last_minute} requests/s, ` +
    `${snap.traffic.failovers_last_minute} failovers${errs ? ", errors: " + errs : ""}`;
}

function spendRows(rows) {
  return rows.map((r) => `<tr data-name="${esc(r.name)}"><td>${esc(r.name)}</td><td class="num">${fmtUsd(r.today_usd)}</td>` +
    `<td class="num">${fmtUsd(r.week_usd)}</td><td class="num">${fmtUsd(r.month_usd)}</td></tr>`).join("");
}

function renderMoney(snap) {
  $("#spend-providers tbody").innerHTML = spendRows(snap.spend_by_provider);
  $("#spend-users tbody").innerHTML = spendRows(snap.spend_by_user) || "<tr><td colspan=4 class='muted'>no user yet</td></tr>";
  const bars = snap.budgets.map((b) => {
    const pct = Math.min(100, b.percent);
    const proj = b.limit_usd > 0 ? Math.min(100, (b.projected_usd / b.limit_usd) * 100) : 0;
    const cls = b.percent >= 100 ? "over" : b.percent >= 80 ? "warn" : "";
    const alerts = b.alerts.length ? ` · alerts at ${b.alerts.map((a) => a + " %").join(", ")}` : "";
    return `<div class="budget" data-scope="${esc(b.scope)}" data-window="${esc(b.window)}">
      <div><b>${esc(b.scope)}</b> ${esc(b.window)}: $${fmtUsd(b.spent_usd)} of $${fmtUsd(b.limit_usd)}
        (<span class="pct">${b.percent.toFixed(1)}</span> %; reserved $${fmtUsd(b.reserved_usd)};
        projected $${fmtUsd(b.projected_usd)} by ${new Date(b.resets_at).toLocaleString()})${esc(alerts)}</div>
      <div class="bar ${cls}"><div class="spent" style="width:${pct}%"></div><div class="proj" style="left:${proj}%" title="projection"></div></div>
    </div>`;
  }).join("");
  $("#budgets").innerHTML = bars || "<p class='muted'>No budget set.</p>";
}

function renderCache(snap) {
  const c = snap.cache;
  $("#cache").innerHTML = `<div><b id="cache-hit-rate">${c.hit_rate == null ? "-" : (c.hit_rate * 100).toFixed(1) + " %"}</b>hit rate</div>
    <div><b>${c.hits} / ${c.misses}</b>hits / misses</div><div><b>${c.entries}</b>entries</div>
    <div><b>$${fmtUsd(c.saved_usd)}</b>saved by hits</div>`;
}

function renderRequests(snap) {
  $("#requests tbody").innerHTML = snap.requests.slice(0, 50).map((r) => {
    const chain = r.attempts.map((a) => `${a.provider}${a.outcome === "ok" ? "" : " ✗" + (a.error_type ? " " + a.error_type : "")}`).join(" → ");
    const status = r.status === "ok" ? "" : ` <b class="error">${esc(r.error_type || "error")}</b>`;
    return `<tr class="clickable" data-id="${esc(r.id)}"><td>${fmtTime(r.at_ms)}</td><td>${esc(r.id)}${status}</td>` +
      `<td>${esc(r.model)}</td><td>${esc(r.provider)}</td><td>${esc(chain)}</td><td class="num">${fmtUsd(r.cost_usd)}</td>` +
      `<td class="num">${fmtMs(r.latency_ms)}</td><td>${r.cached ? "yes" : ""}</td></tr>`;
  }).join("");
  $("#deadletters tbody").innerHTML = snap.dead_letters.slice(0, 20).map((d) =>
    `<tr><td>${new Date(d.at).toLocaleTimeString()}</td><td>${esc(d.source_topic)}</td><td>${esc(d.stage)}</td>` +
    `<td>${esc(d.key)}</td><td>${esc(d.reason)}</td><td class="num">${d.size}</td></tr>`).join("") ||
    "<tr><td colspan=6 class='muted'>none</td></tr>";
}

async function showDetail(id) {
  const box = $("#request-detail");
  openDetail = id;
  // the id as a query parameter: an id such as ".." would be folded away by URL path normalisation
  const resp = await fetch("request?id=" + encodeURIComponent(id), { headers: { accept: "application/json" } });
  if (!resp.ok) { box.hidden = false; box.innerHTML = `<p class="muted">${esc(id)}: no longer among the latest requests</p>`; return; }
  const r = await resp.json();
  const attempts = r.attempts.map((a) => `<tr><td>${esc(a.provider)}</td><td>${esc(a.model)}</td><td>${esc(a.outcome)}</td>` +
    `<td>${esc(a.error_type)}</td><td class="num">${fmtMs(a.latency_ms)}</td></tr>`).join("");
  box.hidden = false;
  box.innerHTML = `<h3 id="detail-id">${esc(r.id)}</h3>
    <div>trace id: <code id="detail-trace">${esc(r.trace_id || "-")}</code> · status ${esc(r.status)} · cost $${fmtUsd(r.cost_usd)} · ${fmtMs(r.latency_ms)} ms</div>
    <table><thead><tr><th>provider</th><th>model</th><th>outcome</th><th>error</th><th>latency (ms)</th></tr></thead><tbody>${attempts}</tbody></table>
    <h3>cost event</h3><pre id="detail-cost">${esc(r.cost_event ? JSON.stringify(r.cost_event, null, 2) : "not arrived (cached, failed or still on its way)")}</pre>`;
}

function render(snap) {
  lastSnapshot = snap;
  if (snap.connected === false) setConn("down", `disconnected from the broker (${snap.disconnected_s ?? 0} s)`);
  else setConn("live", "live");
  renderProviders(snap);
  renderCircuitChart(snap);
  renderTraffic(snap);
  renderMoney(snap);
  renderCache(snap);
  renderRequests(snap);
}

$("#requests").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-id]");
  if (row) showDetail(row.dataset.id);
});

async function start() {
  const resp = await fetch("state", { headers: { accept: "application/json" } });
  if (resp.status === 401) { window.location.reload(); return; }
  if (resp.ok) render(await resp.json());
  const events = new EventSource("events");
  events.addEventListener("snapshot", (ev) => render(JSON.parse(ev.data)));
  events.onerror = async () => {
    setConn("down", "disconnected from the dashboard server: reconnecting…");
    try {  // a session that ended (expired, logged out, a restarted server) gets the login form again
      const check = await fetch("state", { headers: { accept: "application/json" } });
      if (check.status === 401) { events.close(); window.location.reload(); }
    } catch (_) { /* the server is down: EventSource keeps retrying */ }
  };
  events.onopen = () => { if (lastSnapshot) render(lastSnapshot); };
}

start();
