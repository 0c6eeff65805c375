// The FLORA dashboard: renders /api/state, then follows /api/events (server-sent events; polling if they fail).
// Every value comes from devices on the network: it is only ever set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
// A script error is shown on the page (and read by the browser test), never swallowed.
window.addEventListener("error", (e) => { document.body.dataset.error = String(e.message); });
window.addEventListener("unhandledrejection", (e) => { document.body.dataset.error = String(e.reason); });
const state = { snap: null, sortKey: "client_id", sortDesc: false, charts: {} };

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return typeof v === "number" ? v.toFixed(digits === undefined ? 4 : digits) : String(v);
}

function ago(ts, now) {
  if (typeof ts !== "number") return "–";
  const s = Math.max(0, now - ts);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function setText(id, text) { $(id).textContent = text; }

function renderCards(snap) {
  setText("federation", snap.federation || "");
  setText("model", (snap.model_id || "").slice(0, 16));
  setText("run", snap.run_id || "–");
  const phase = $("phase");
  phase.textContent = snap.phase || "–";
  phase.className = "badge" + (snap.phase === "done" ? " done" : "");
  const src = $("source");
  src.textContent = snap.live ? "live" : "read-only (state dir)";
  src.className = snap.live ? "badge" : "badge readonly";
  setText("updated", "updated " + new Date(snap.generated_at * 1000).toLocaleTimeString());
  const total = snap.rounds_total;
  setText("round", snap.phase === "done" ? `${snap.rounds_completed} / ${total}` : `${fmt(snap.round, 0)} / ${total}`);
  setText("round-note", `${snap.rounds_completed} completed · ${snap.mode} · ${snap.strategy}`);
  const cur = snap.current;
  if (cur) {
    const left = cur.deadline - snap.generated_at;
    setText("deadline", left > 0 ? `${Math.round(left)} s` : "due");
    setText("deadline-note", `extended ${cur.extensions} time(s)`);
    setText("quorum", `${cur.reported} / ${cur.asked}`);
    setText("quorum-note", cur.quorum ? `quorum ${cur.quorum}; ${cur.rejected} rejected this round` : "");
  } else {
    setText("deadline", "–"); setText("deadline-note", snap.phase === "done" ? "federation done" : "no round open");
    setText("quorum", "–"); setText("quorum-note", "");
  }
  const t = snap.totals || {};
  setText("bytes", `${fmt((t.bytes_up || 0) / 1e6, 2)} / ${fmt((t.bytes_down || 0) / 1e6, 2)}`);
  setText("bytes-note", `${t.updates_accepted || 0} updates accepted`);
  setText("rejected", String(t.updates_rejected || 0));
  const reasons = Object.entries(snap.rejections || {}).map(([r, n]) => `${r} ${n}`);
  setText("rejections", reasons.join(", "));
  const eps = typeof snap.epsilon === "number";
  $("epsilon-card").hidden = !eps;
  if (eps) setText("epsilon", fmt(snap.epsilon, 2));
}

function lineChart(canvas, label, yType) {
  return new window.Chart(canvas, {
    type: "line",
    data: { labels: [], datasets: [] },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false, spanGaps: true,
      scales: { x: { title: { display: true, text: "rounds completed" } },
        y: { type: yType || "linear", title: { display: true, text: label } } },
      plugins: { legend: { position: "bottom" } },
    },
  });
}

function series(points, key) { return points.map((p) => (typeof p[key] === "number" ? p[key] : null)); }

function renderCharts(snap) {
  const points = snap.points || [];
  document.body.dataset.roundPoints = String(points.length);
  if (!window.Chart) return;  // the page still shows the cards and the device table
  if (!state.charts.acc) {
    state.charts.acc = lineChart($("accuracy-chart"), "accuracy");
    state.charts.loss = lineChart($("loss-chart"), "loss (log scale)", "logarithmic");
  }
  const labels = points.map((p) => p.rounds_completed);
  const sets = {
    acc: [["global, held-out test", "test_accuracy", "#2f6fdb"], ["clients, local validation (mean)",
      "mean_client_accuracy", "#12a150"]],
    loss: [["global, held-out test", "test_loss", "#2f6fdb"], ["clients, training (mean)", "mean_client_loss",
      "#d97706"]],
  };
  for (const [name, defs] of Object.entries(sets)) {
    const chart = state.charts[name];
    chart.data.labels = labels;
    chart.data.datasets = defs.filter(([, key]) => points.some((p) => typeof p[key] === "number"))
      .map(([label, key, color]) => ({ label, data: series(points, key), borderColor: color, backgroundColor: color,
        pointRadius: 3, tension: 0.15 }));
    chart.update();
  }
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function compare(a, b, key) {
  const x = a[key], y = b[key];
  if (x === y) return 0;
  if (x === null || x === undefined) return 1;
  if (y === null || y === undefined) return -1;
  return typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
}

function renderDevices(snap) {
  const devices = snap.devices || [];
  document.body.dataset.devices = String(devices.length);
  const select = $("state-filter");
  const states = [...new Set(devices.map((d) => d.state))].sort();
  const chosen = select.value;
  select.replaceChildren(new Option("every state", ""), ...states.map((s) => new Option(s, s)));
  select.value = states.includes(chosen) ? chosen : "";
  const needle = $("filter").value.trim().toLowerCase();
  const shown = devices.filter((d) => (!select.value || d.state === select.value) && (!needle ||
    [d.client_id, d.state, d.backend, d.last_error].some((v) => v && String(v).toLowerCase().includes(needle))));
  shown.sort((a, b) => (state.sortDesc ? -1 : 1) * compare(a, b, state.sortKey));
  const rows = shown.map((d) => {
    const tr = document.createElement("tr");
    tr.dataset.client = d.client_id;
    tr.append(cell(d.client_id), cell(d.state, `state state-${d.state}`), cell(ago(d.last_seen, snap.generated_at)),
      cell(d.backend || "–"), cell(fmt(d.num_samples, 0), "num"), cell(fmt(d.loss), "num"),
      cell(fmt(d.accuracy), "num"), cell(typeof d.step_time_s === "number" ? fmt(1e3 * d.step_time_s, 1) : "–", "num"),
      cell(fmt(d.peak_rss_mb, 0), "num"), cell(d.last_error || "", "error"));
    if (d.last_error) tr.lastChild.title = d.last_error;
    return tr;
  });
  $("devices").tBodies[0].replaceChildren(...rows);
  setText("device-count", `(${shown.length} of ${devices.length})`);
  for (const th of document.querySelectorAll("#devices th")) {
    th.classList.toggle("sorted", th.dataset.key === state.sortKey);
    th.classList.toggle("desc", th.dataset.key === state.sortKey && state.sortDesc);
  }
}

function render(snap) {
  state.snap = snap;
  renderCards(snap);
  renderCharts(snap);
  renderDevices(snap);
  document.body.dataset.loaded = "true";
}

async function poll() {
  try {
    const res = await fetch("/api/state", { cache: "no-store" });
    if (res.ok) render(await res.json());
  } catch (err) {
    $("phase").textContent = "unreachable";
  }
}

function follow() {
  if (!window.EventSource) { setInterval(poll, 2000); return; }
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
  events.onerror = () => { events.close(); setTimeout(follow, 3000); poll(); };
}

document.addEventListener("DOMContentLoaded", () => {
  for (const th of document.querySelectorAll("#devices th")) {
    th.addEventListener("click", () => {
      state.sortDesc = state.sortKey === th.dataset.key ? !state.sortDesc : false;
      state.sortKey = th.dataset.key;
      if (state.snap) renderDevices(state.snap);
    });
  }
  $("filter").addEventListener("input", () => state.snap && renderDevices(state.snap));
  $("state-filter").addEventListener("change", () => state.snap && renderDevices(state.snap));
  const embedded = $("snapshot").textContent.trim();  // the snapshot the page was served with
  if (embedded && embedded !== "<!--SNAPSHOT-->") render(JSON.parse(embedded));
  else poll();
  follow();
});
