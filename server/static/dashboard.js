// Alchemist dashboard: hand-written SVG line charts over GET /dashboard/data (no libraries, no CDN).
// Each panel is a <section data-panel=ID data-points=N> whose .latest text is its newest value.
"use strict";
(function () {
  const REFRESH_MS = 3000;
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#475569"];
  const MEM = ["weights", "kv_cache", "activation_pool_device", "activation_pool_cpu", "training_peak",
               "device_allocated", "device_reserved", "process_rss"];
  const PANELS = [
    {id: "throughput", title: "Serving tokens/s", unit: "tok/s",
     series: {output_tps: "output", prompt_tps: "prompt"}},
    {id: "ttft", title: "Time to first token", unit: "s", series: {ttft_p50: "p50", ttft_p99: "p99"}},
    {id: "itl", title: "Inter-token latency", unit: "s", series: {itl_p50: "p50", itl_p99: "p99"}},
    {id: "requests", title: "Requests", unit: "", series: {running: "running", waiting: "waiting"}},
    {id: "kv_cache", title: "KV-cache usage", unit: "%", scale: 100, series: {kv_usage: "used"}},
    {id: "memory", title: "Memory by component", unit: "B",
     series: Object.fromEntries(MEM.map((c) => ["mem_" + c, c]))},
    {id: "trained_tokens", title: "Trained tokens/s by path", unit: "tok/s",
     series: {trained_tps_reuse: "reuse", trained_tps_recompute: "recompute"}},
    {id: "reuse_outcomes", title: "Activation reuse outcomes (total)", unit: "",
     series: {reuse_hit: "hit", reuse_stale: "stale", reuse_evicted: "evicted", reuse_too_stale: "too_stale"}},
    {id: "ratings", title: "Ratings per minute", unit: "/min", series: {ratings_per_min: "ratings"}},
    {id: "positive_share", title: "Positive share (sliding window)", unit: "%", scale: 100,
     series: {positive_share: "positive"}},
    {id: "pending", title: "Pending feedback backlog", unit: "", series: {pending: "ratings"},
     stats: [["backlog_tokens", "tokens", ""], ["oldest_pending_s", "oldest", "s"],
             ["train_tps_window", "trained (1 min)", "tok/s"], ["training_paused", "training", "paused"]]},
    {id: "backlog_tokens", title: "Backlog tokens (rated, not yet trained)", unit: "tok",
     series: {backlog_tokens: "tokens"}},
    {id: "oldest_pending", title: "Oldest pending rating", unit: "s", series: {oldest_pending_s: "age"}},
    {id: "adapter", title: "Adapter version and training loss", unit: "",
     series: {adapter_version: "version", train_loss: "loss"}},
  ];
  const SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, parent, ns) {
    const node = ns ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmt(v, unit) {
    if (v === null || v === undefined) return "–";
    if (unit === "B") {
      const units = ["B", "KiB", "MiB", "GiB", "TiB"];
      let i = 0;
      while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
      return v.toFixed(i ? 1 : 0) + " " + units[i];
    }
    const a = Math.abs(v);
    const s = Number.isInteger(v) ? String(v) : a >= 100 ? v.toFixed(0)
      : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
    return unit ? s + " " + unit : s;
  }

  function build() {
    const main = document.getElementById("panels");
    for (const p of PANELS) {
      const sec = el("section", {"class": "panel", "data-panel": p.id, "data-points": "0"}, main);
      const h = el("h2", {}, sec);
      h.textContent = p.title;
      el("span", {"class": "latest"}, h).textContent = "–";
      p.svg = el("svg", {viewBox: "0 0 400 140", preserveAspectRatio: "none", role: "img"}, sec, true);
      const legend = el("div", {"class": "legend"}, sec);
      Object.values(p.series).forEach((label, i) => {
        const item = el("span", {}, legend);
        el("i", {style: "background:" + COLORS[i % COLORS.length]}, item);
        item.appendChild(document.createTextNode(label));
      });
      if (p.stats) {
        const row = el("div", {"class": "stats"}, sec);
        for (const [key, label] of p.stats) {
          const item = el("span", {"data-stat": key}, row);
          item.appendChild(document.createTextNode(label + " "));
          el("b", {}, item).textContent = "–";
        }
      }
      p.section = sec;
    }
  }

  function draw(p, t, series) {
    const scale = p.scale || 1;
    const cols = Object.keys(p.series).map((k) => (series[k] || []).map((v) => (v === null ? null : v * scale)));
    const values = cols.flat().filter((v) => v !== null);
    const svg = p.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    el("line", {"class": "axis", x1: 40, y1: 125, x2: 400, y2: 125}, svg, true);
    p.section.setAttribute("data-points", String(values.length));
    if (!values.length || !t.length) { p.section.querySelector(".latest").textContent = "no data yet"; return; }
    const lo = Math.min(0, ...values), hi = Math.max(...values, lo + 1e-9);
    const t0 = t[0], t1 = Math.max(t[t.length - 1], t0 + 1e-9);
    const x = (ti) => 40 + (360 * (ti - t0)) / (t1 - t0);
    const y = (v) => 125 - (115 * (v - lo)) / (hi - lo);
    el("text", {x: 2, y: 14}, svg, true).textContent = fmt(hi, p.unit === "B" ? "B" : "");
    el("text", {x: 2, y: 125}, svg, true).textContent = fmt(lo, p.unit === "B" ? "B" : "");
    const latest = [];
    cols.forEach((col, i) => {
      let d = "", pen = "M";
      col.forEach((v, j) => {
        if (v === null) { pen = "M"; return; }
        d += pen + x(t[j]).toFixed(1) + " " + y(v).toFixed(1) + " ";
        pen = "L";
      });
      const color = COLORS[i % COLORS.length];
      if (d) el("path", {d: d, fill: "none", stroke: color, "stroke-width": 1.5}, svg, true);
      const last = col.filter((v) => v !== null).pop();
      if (last !== undefined) {
        const j = col.lastIndexOf(last);
        el("circle", {cx: x(t[j]), cy: y(last), r: 2, fill: color}, svg, true);
        latest.push(Object.values(p.series)[i] + " " + fmt(last, p.unit));
      }
    });
    p.section.querySelector(".latest").textContent = latest.slice(0, 3).join(" · ");
  }

  function newest(col) {
    for (let j = (col || []).length - 1; j >= 0; j--) if (col[j] !== null) return col[j];
    return null;
  }

  function drawStats(p, series) {
    for (const [key, , unit] of p.stats || []) {
      const v = newest(series[key]);
      const text = unit === "paused" ? (v === null ? "–" : v ? "paused" : "running") : fmt(v, unit);
      const b = p.section.querySelector(`[data-stat="${key}"] b`);
      b.textContent = text;
      b.parentNode.setAttribute("data-value", v === null ? "" : String(v));
    }
  }

  function setStatus(text, state) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.setAttribute("data-state", state);
  }

  // the history held here: the whole of it from the first request, then only the points after the
  // newest held (?since=t), appended and trimmed to the server's bound; a new `boot` starts over
  let held = null;

  function merge(data) {
    const fresh = data.series;
    if (!held || held.boot !== data.boot) { held = {boot: data.boot, interval_s: data.interval_s, series: {}}; }
    const n = (fresh.t || []).length, old = (held.series.t || []).length;
    const keys = new Set([...Object.keys(held.series), ...Object.keys(fresh)]);
    for (const k of keys) {
      const col = held.series[k] || new Array(old).fill(null);
      held.series[k] = col.concat(fresh[k] || new Array(n).fill(null)).slice(-data.max_points);
    }
    return held.series;
  }

  async function refresh() {
    const newest = held && held.series.t && held.series.t.length ? held.series.t[held.series.t.length - 1] : null;
    const url = "/dashboard/data" + (newest === null ? "" : "?since=" + newest);
    // the browser sends the credentials that opened the page (HTTP Basic, the key as password)
    const response = await fetch(url, {cache: "no-store", credentials: "same-origin"});
    if (response.status === 401) {
      setStatus("the API key was refused: reload the page to sign in again", "auth");
      return;
    }
    if (!response.ok) { setStatus("data: HTTP " + response.status, "error"); return; }
    const series = merge(await response.json());
    const t = series.t || [];
    for (const p of PANELS) { draw(p, t, series); drawStats(p, series); }
    setStatus(t.length + " points, one every " + held.interval_s + " s, updated " +
              new Date().toLocaleTimeString(), "ok");
  }

  function loop() {
    refresh().catch((err) => setStatus("refresh failed: " + err, "error"))
      .finally(() => setTimeout(loop, REFRESH_MS));
  }

  build();
  loop();
})();
