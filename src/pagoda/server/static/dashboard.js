// Live metrics page: scrapes this server's /metrics (Prometheus text format) every POLL_MS and
// charts what Grafana would (examples/grafana/pagoda.json), with no Prometheus in between.
// Rates and latency quantiles are computed over the last WINDOW_MS of scrapes, the way
// rate() and histogram_quantile() do: counter deltas, and linear interpolation inside the
// histogram bucket that holds the quantile's rank.
"use strict";

const POLL_MS = 2000;
const WINDOW_MS = 15000;   // rates and quantiles over this much history
const KEEP_POINTS = 150;   // five minutes of chart at POLL_MS

// name -> [{labels, value}] from the text exposition format
function parse(text) {
  const series = new Map();
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^\s{]+)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    const value = m[3] === "+Inf" ? Infinity : Number(m[3]);
    if (!series.has(m[1])) series.set(m[1], []);
    series.get(m[1]).push({ labels, value });
  }
  return series;
}

function total(series, name) {
  return (series.get(name) || []).reduce((acc, s) => acc + s.value, 0);
}

// cumulative bucket counts by upper bound, summed over every label set: [[le, count], ...]
function buckets(series, base) {
  const byLe = new Map();
  for (const s of series.get(base + "_bucket") || []) {
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    byLe.set(le, (byLe.get(le) || 0) + s.value);
  }
  return [...byLe.entries()].sort((a, b) => a[0] - b[0]);
}

// Prometheus' histogram_quantile over cumulative [[le, count], ...]; null without observations
function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const count = cumulative[cumulative.length - 1][1];
  if (!(count > 0)) return null;
  const rank = q * count;
  let prevLe = 0, prevCount = 0;
  for (const [le, c] of cumulative) {
    if (c >= rank) {
      if (le === Infinity) return prevLe;  // the rank is past the last finite bound
      if (c === prevCount) return le;
      return prevLe + (le - prevLe) * (rank - prevCount) / (c - prevCount);
    }
    prevLe = le;
    prevCount = c;
  }
  return prevLe;
}

// bucket-wise difference of two cumulative histograms (the observations between two scrapes)
function delta(now, before) {
  const old = new Map(before);
  return now.map(([le, c]) => [le, c - (old.get(le) || 0)]);
}

const scrapes = [];  // {t, series}
const history = { t: [], output: [], prompt: [], ttft50: [], ttft95: [], itl50: [], itl95: [],
                  running: [], waiting: [], kv: [] };

function record(now, series) {
  scrapes.push({ t: now, series });
  while (scrapes.length > 2 && now - scrapes[1].t >= WINDOW_MS) scrapes.shift();
  const base = scrapes[0];
  const dt = (now - base.t) / 1000;
  const rate = (name) => dt > 0 ? (total(series, name) - total(base.series, name)) / dt : null;
  const recent = (name) => delta(buckets(series, name), buckets(base.series, name));
  const point = {
    output: rate("pagoda:generation_tokens_total"),
    prompt: rate("pagoda:prompt_tokens_total"),
    ttft50: quantile(0.5, recent("pagoda:time_to_first_token_seconds")),
    ttft95: quantile(0.95, recent("pagoda:time_to_first_token_seconds")),
    itl50: quantile(0.5, recent("pagoda:inter_token_latency_seconds")),
    itl95: quantile(0.95, recent("pagoda:inter_token_latency_seconds")),
    running: total(series, "pagoda:num_requests_running"),
    waiting: total(series, "pagoda:num_requests_waiting"),
    kv: 100 * total(series, "pagoda:kv_cache_usage_perc"),
  };
  history.t.push(new Date(now));
  for (const [k, v] of Object.entries(point)) history[k].push(v);
  if (history.t.length > KEEP_POINTS) for (const k of Object.keys(history)) history[k].shift();
  return point;
}

const ms = (s) => s === null ? "–" : `${(1000 * s).toFixed(s < 0.1 ? 1 : 0)} ms`;

function show(point, series) {
  document.getElementById("tile-output-rate").textContent =
    point.output === null ? "–" : point.output.toFixed(1);
  document.getElementById("tile-ttft").textContent = ms(point.ttft50);
  document.getElementById("tile-itl").textContent = ms(point.itl50);
  document.getElementById("tile-queue").textContent = `${point.running} / ${point.waiting}`;
  document.getElementById("tile-kv").textContent = `${point.kv.toFixed(1)} %`;
  document.getElementById("tile-generated").textContent =
    String(total(series, "pagoda:generation_tokens_total"));
  const running = series.get("pagoda:num_requests_running") || [];
  if (running.length) document.getElementById("model").textContent = running[0].labels.model_name;
}

const LAYOUT = { margin: { l: 50, r: 10, t: 30, b: 30 }, legend: { orientation: "h" },
                 xaxis: { type: "date", tickformat: "%H:%M:%S" } };

function line(name, y, scale = 1) {
  return { x: history.t, y: y.map((v) => v === null ? null : v * scale), name,
           type: "scatter", mode: "lines", connectgaps: false };
}

function draw() {
  const chart = (id, title, unit, traces) => Plotly.react(id, traces,
    { ...LAYOUT, title: { text: title, font: { size: 14 } }, yaxis: { title: unit, rangemode: "tozero" } },
    { displayModeBar: false, responsive: true });
  chart("chart-throughput", "Throughput", "tokens/s",
        [line("output", history.output), line("prompt", history.prompt)]);
  chart("chart-ttft", "Time to first token", "ms",
        [line("p50", history.ttft50, 1000), line("p95", history.ttft95, 1000)]);
  chart("chart-itl", "Inter-token latency", "ms",
        [line("p50", history.itl50, 1000), line("p95", history.itl95, 1000)]);
  chart("chart-queue", "Requests", "requests",
        [line("running", history.running), line("waiting", history.waiting)]);
  chart("chart-kv", "KV cache used", "%", [line("used", history.kv)]);
}

async function poll() {
  const state = document.getElementById("state");
  try {
    const r = await fetch("/metrics", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const series = parse(await r.text());
    const point = record(Date.now(), series);
    show(point, series);
    draw();
    state.textContent = `updated ${new Date().toLocaleTimeString()}`;
    state.dataset.scrapes = String(Number(state.dataset.scrapes || 0) + 1);
  } catch (err) {
    state.textContent = `cannot read /metrics: ${err.message}`;
  }
  setTimeout(poll, POLL_MS);
}

window.pagodaDashboard = { parse, quantile, buckets, history };
poll();
