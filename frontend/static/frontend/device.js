/* Device telemetry charts: one Plotly chart per metric, fed by /devices/<uid>/series.json. */
"use strict";

(function () {
  const box = document.getElementById("charts");
  if (!box || !window.Plotly) return;
  const meta = document.getElementById("chart-meta");
  const buttons = document.querySelectorAll("[data-range]");
  const seconds = (s) => (s >= 3600 ? s / 3600 + " h" : s >= 60 ? s / 60 + " min" : s + " s");

  async function load(range) {
    buttons.forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.range === range)));
    meta.textContent = "Loading " + range + "…";
    let data;
    try {
      const res = await fetch(box.dataset.url + "?range=" + encodeURIComponent(range), { credentials: "same-origin" });
      data = await res.json();
      if (!res.ok) throw new Error(data.detail || res.statusText);
    } catch (e) {
      meta.textContent = "Could not load telemetry: " + e.message;
      return;
    }
    const source = { raw: "raw points", "1m": "1-minute rollups", "1h": "1-hour rollups" }[data.source] || "no data";
    meta.textContent = "Last " + range + " · " + source + (data.bucket_s ? ", averaged per " + seconds(data.bucket_s) : "") +
      (data.truncated ? " · truncated" : "") + " · times in " + Intl.DateTimeFormat().resolvedOptions().timeZone;
    const byMetric = Object.fromEntries(data.series.map((s) => [s.metric, s]));
    box.querySelectorAll(".plot").forEach((el) => {
      const s = byMetric[el.dataset.metric];
      const points = s ? s.points : [];
      const unit = el.dataset.unit;
      const trace = {
        x: points.map((p) => new Date(p[0])), y: points.map((p) => p[1]), type: "scatter", mode: "lines",
        line: { width: 1.5, color: "#2563eb" }, name: el.dataset.metric,
        hovertemplate: "%{x|%Y-%m-%d %H:%M:%S}<br>%{y:.3f}" + (unit ? " " + unit : "") + "<extra></extra>",
      };
      const layout = {
        margin: { l: 50, r: 10, t: 10, b: 30 }, height: 220, showlegend: false,
        xaxis: { type: "date", range: [new Date(data.start), new Date(data.end)] },
        yaxis: { title: { text: unit || "" }, zeroline: false },
        annotations: points.length ? [] : [{ text: "no data in this range", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }],
      };
      el.dataset.points = String(points.length);
      window.Plotly.react(el, [trace], layout, { displaylogo: false, responsive: true });
    });
    box.dataset.loaded = range;
  }

  buttons.forEach((b) => b.addEventListener("click", () => load(b.dataset.range)));
  load(box.dataset.default);
})();
