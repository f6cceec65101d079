// adaspec live dashboard: polls /dashboard/stats.json every second and draws
// four canvas charts (no chart library, no external assets).
"use strict";

const POLL_MS = 1000;
const THROUGHPUT_COLOR = "#2563eb";
const FIXED_COLORS = { ngram: "#2563eb", suffix: "#ea580c", none: "#9ca3af" };
const PALETTE = ["#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];
const GRID = "#e5e7eb", AXIS_TEXT = "#6b7280";

function colorFor(name, i) { return FIXED_COLORS[name] || PALETTE[i % PALETTE.length]; }

// Size the canvas backing store to its CSS box (sharp on high-DPI screens).
function setup(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h, left: 44, right: w - 8, top: 8, bottom: h - 20 };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function axes(g, yMax, xLabels, yFmt) {
  const { ctx, left, right, top, bottom } = g;
  ctx.strokeStyle = GRID; ctx.fillStyle = AXIS_TEXT; ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - top) * i / 4;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(right, y + 0.5); ctx.stroke();
    ctx.fillText(yFmt(yMax * i / 4), left - 4, y);
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const [x, label] of xLabels) ctx.fillText(label, x, bottom + 4);
}

// series: [{name, color, values: [number|null]}]; null leaves a gap.
function lineChart(canvas, series, opts) {
  const g = setup(canvas);
  const n = Math.max(1, opts.n || 0, ...series.map(s => s.values.length));
  let yMax = opts.yMax;
  if (yMax === undefined) yMax = niceMax(Math.max(0, ...series.flatMap(s => s.values.filter(v => v !== null))));
  const xOf = i => g.left + (g.right - g.left) * (n === 1 ? 1 : i / (n - 1));
  const yOf = v => g.bottom - (g.bottom - g.top) * Math.min(v, yMax) / yMax;
  axes(g, yMax, opts.xLabels(xOf, n), opts.yFmt || (v => String(Math.round(v * 10) / 10)));
  for (const s of series) {
    g.ctx.strokeStyle = s.color; g.ctx.lineWidth = 2; g.ctx.beginPath();
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) { pen = false; return; }
      if (pen) g.ctx.lineTo(xOf(i), yOf(v)); else g.ctx.moveTo(xOf(i), yOf(v));
      pen = true;
    });
    g.ctx.stroke();
    if (opts.fill && series.length === 1) {  // light area under a single series
      g.ctx.globalAlpha = 0.15; g.ctx.fillStyle = s.color; g.ctx.beginPath(); g.ctx.moveTo(xOf(0), g.bottom);
      s.values.forEach((v, i) => g.ctx.lineTo(xOf(i), yOf(v || 0)));
      g.ctx.lineTo(xOf(n - 1), g.bottom); g.ctx.closePath(); g.ctx.fill(); g.ctx.globalAlpha = 1;
    }
  }
}

// Stacked shares per x: series values are counts; each column sums to 100 %.
function shareChart(canvas, series, xLabels, nPoints) {
  const g = setup(canvas);
  const n = Math.max(1, nPoints || 0, ...series.map(s => s.values.length));
  axes(g, 1, xLabels(i => g.left + (g.right - g.left) * (i + 0.5) / n, n), v => Math.round(v * 100) + "%");
  const bw = (g.right - g.left) / n;
  for (let i = 0; i < n; i++) {
    const total = series.reduce((a, s) => a + (s.values[i] || 0), 0);
    if (!total) continue;
    let y = g.bottom;
    for (const s of series) {
      const h = (g.bottom - g.top) * (s.values[i] || 0) / total;
      g.ctx.fillStyle = s.color; g.ctx.fillRect(g.left + i * bw, y - h, Math.max(1, bw - 0.5), h);
      y -= h;
    }
  }
}

function barChart(canvas, labels, values, color) {
  const g = setup(canvas);
  const n = Math.max(1, labels.length);
  const yMax = niceMax(Math.max(0, ...values));
  const bw = (g.right - g.left) / n;
  axes(g, yMax, labels.map((l, i) => [g.left + bw * (i + 0.5), l]), v => String(Math.round(v)));
  g.ctx.fillStyle = color;
  values.forEach((v, i) => {
    const h = (g.bottom - g.top) * v / yMax;
    g.ctx.fillRect(g.left + bw * i + bw * 0.15, g.bottom - h, bw * 0.7, h);
  });
}

function timeLabels(t) {
  return (xOf, n) => {
    const out = [];
    for (let i = 0; i < n; i++) if (t[i] % 30 === 0 || i === n - 1) out.push([xOf(i), t[i] === 0 ? "now" : t[i] + "s"]);
    return out;
  };
}

// Acceptance over a trailing window: sum accepted / sum proposed is not in the
// per-second series, so average the per-second rates that exist.
function smooth(values, w) {
  return values.map((_, i) => {
    const win = values.slice(Math.max(0, i - w + 1), i + 1).filter(v => v !== null);
    return win.length ? win.reduce((a, b) => a + b, 0) / win.length : null;
  });
}

function legend(id, items) {
  document.getElementById(id).innerHTML = items
    .map(([color, text]) => `<span><i style="background:${color}"></i>${escapeHtml(text)}</span>`).join("");
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

const fmt = (v, d = 2) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);

function render(s) {
  document.getElementById("model").textContent = "· " + s.model + " · window " + s.max_model_len;
  document.getElementById("status").textContent =
    "updated " + new Date(s.now * 1000).toLocaleTimeString() + " · up " + Math.round(s.uptime_s) + " s · speculators: " +
    (s.speculators.length ? s.speculators.join(", ") : "none");
  const tot = s.totals, bySpec = tot.by_speculator;
  let prop = 0, acc = 0;
  for (const k in bySpec) { prop += bySpec[k].proposed; acc += bySpec[k].accepted; }
  document.getElementById("tile-tps").textContent = fmt(s.tokens_per_s, 1);
  document.getElementById("tile-active").textContent = s.active_requests + " / " + s.queue_depth;
  document.getElementById("tile-requests").textContent = tot.requests;
  document.getElementById("tile-tokens").textContent = tot.generated_tokens;
  document.getElementById("tile-acc").textContent = prop ? fmt(acc / prop) : "–";

  const t = s.series.t;
  lineChart(document.getElementById("chart-throughput"),
    [{ name: "tokens/s", color: THROUGHPUT_COLOR, values: s.series.tokens_per_s }], { xLabels: timeLabels(t), fill: true });
  legend("legend-throughput", [[THROUGHPUT_COLOR, "generated tokens per second"]]);

  const accNames = Object.keys(s.series.acceptance_rate);
  const accSeries = accNames.map((name, i) => ({ name, color: colorFor(name, i), values: smooth(s.series.acceptance_rate[name], 5) }));
  lineChart(document.getElementById("chart-acceptance"), accSeries, { yMax: 1, n: t.length, xLabels: timeLabels(t), yFmt: v => v.toFixed(2) });
  legend("legend-acceptance", accNames.length ? [] : [[GRID, "no draft tokens proposed yet"]]);
  if (accNames.length) legend("legend-acceptance", accNames.map((name, i) => [colorFor(name, i),
    `${name}: rate ${fmt(bySpec[name] && bySpec[name].acceptance_rate)}, mean acceptance length ${fmt(bySpec[name] && bySpec[name].mean_acceptance_length)}`]));

  const stepNames = Object.keys(s.series.steps);
  const stepSeries = stepNames.map((name, i) => ({ name, color: colorFor(name, i), values: s.series.steps[name] }));
  shareChart(document.getElementById("chart-share"), stepSeries, timeLabels(t), t.length);
  const stepTotal = stepNames.reduce((a, n) => a + (bySpec[n] ? bySpec[n].steps : 0), 0);
  legend("legend-share", stepNames.map((name, i) => [colorFor(name, i),
    `${name}: ${stepTotal ? Math.round(100 * (bySpec[name] ? bySpec[name].steps : 0) / stepTotal) : 0}% of steps`]));

  const hist = tot.draft_tokens_per_step;
  const ks = Object.keys(hist).map(Number).sort((a, b) => a - b);
  barChart(document.getElementById("chart-lookahead"), ks.map(String), ks.map(k => hist[String(k)]), "#0891b2");
  const steps = ks.reduce((a, k) => a + hist[String(k)], 0);
  legend("legend-lookahead", [["#0891b2", steps ? `mean ${fmt(ks.reduce((a, k) => a + k * hist[String(k)], 0) / steps)} draft tokens over ${steps} steps` : "no steps yet"]]);

  document.querySelector("#recent tbody").innerHTML = s.recent_requests.map(r => `<tr>
    <td>${escapeHtml(r.request_id.slice(0, 18))}</td><td>${escapeHtml(r.tenant)}</td><td>${escapeHtml(r.endpoint)}${r.stream ? " (stream)" : ""}</td>
    <td>${r.prompt_tokens}</td><td>${r.completion_tokens}</td><td>${fmt(r.tokens_per_s, 1)}</td><td>${fmt(r.ttft_s, 3)}</td>
    <td>${fmt(r.acceptance_rate)}</td><td>${fmt(r.mean_acceptance_length)}</td><td>${escapeHtml(r.finish_reason)}</td></tr>`).join("");
}

async function poll() {
  try {
    const resp = await fetch("/dashboard/stats.json", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the server: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
